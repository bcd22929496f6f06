"""The execution setting of a cell, chosen by measurement on this machine (``trainer.precision: auto`` and
``trainer.channels_last: auto``, the quick profile's default).

Which setting is fastest depends on the machine and the model: on one 2-core AMD EPYC with avx512_bf16 (no AMX) bf16
autocast with channels_last trained the quick baseline ~2.2x faster than fp32 and AC2D's transformer 0.65x
(results/perf/speed_settings.md); on an Intel Xeon with AMX the issue measured 1.7x and 0.6x. So nothing is hard-
coded: before the cells start, the runner times a training step of each paper's main model (at the cell's input
size, batch and threads; every ablation of a paper gets its main model's setting, so a model and its ablations are
compared under one setting) under each candidate of :data:`aurecog.models.probe.SETTINGS` and takes the fastest, if
it beats fp32 by at least :data:`MIN_GAIN`; otherwise fp32. The measurement is stored per machine (CPU model or GPU
name, core count, torch build) in ``cache/speed.json`` and reused, so a machine always makes the same choice and
cells keep their identity; ``aurecog speed --remeasure`` measures again. The chosen setting is resolved into the
cell's config (``trainer.precision``, ``trainer.channels_last``) and so into its identity, like threads.

Whether accuracy holds under bf16 was measured (fp32 vs bf16 + channels_last cells on the same folds:
results/perf/speed_settings_grid.md, one seed; results/perf/speed_settings_seeds.md, 3 seeds, where the baseline's
and IERN's one-seed deficits, -1.6 and -1.0 F1, came out +0.1 [-2.1, +2.2] and -0.2 [-3.3, +3.0] with training
noise counted); a family whose accuracy did not hold would set ``trainer.precision: 32-true`` in its quick
profile (none does now), and explicit settings are never overridden. torch.compile is not a candidate: compiling costs
more per cell process than a quick cell trains (measured in the same table).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from filelock import FileLock

from aurecog.config import REPO_ROOT

CACHE = REPO_ROOT / "cache" / "speed.json"
#: a setting must be this much faster than fp32 to be chosen (timings drift 10-30% between runs; a 10% margin
#: keeps a near-tie at fp32, the reference numerics)
MIN_GAIN = 1.10
AUTO = "auto"
#: labels of the timed model: BP4D's 12 AUs (the default presets'); the label count, not the data, sets the cost
PROBE_LABELS = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24")


def machine_key() -> str:
    """CPU model (or GPU name), logical cores and torch build: what a speed choice is valid for."""
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    dev = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{dev} x{os.cpu_count()} torch {torch.__version__}"


def wants_choice(cfg: dict) -> bool:
    t = cfg.get("trainer") or {}
    return t.get("precision") == AUTO or t.get("channels_last") == AUTO


def _measure(cfg: dict, threads: int, steps: int = 4, warmup: int = 2) -> dict[str, float]:
    import torch

    from aurecog.models.backbones import no_pretrained
    from aurecog.models.probe import SETTINGS, probe_batch, probe_stats, train_step_rate
    from aurecog.models.registry import build_model
    from aurecog.tasks import TaskSpec

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        task = TaskSpec("au", list(PROBE_LABELS))
        size, batch = int(cfg["data"]["input_size"]), int(cfg["data"]["batch_size"])
        accel = (cfg.get("trainer") or {}).get("accelerator", "auto")
        device = "cuda" if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
        rates = {}
        for name, (precision, cl) in SETTINGS.items():
            torch.manual_seed(0)
            with no_pretrained():
                model = build_model(cfg, task, probe_stats(task)).to(device)
            if hasattr(model, "prototype_ready"):  # AC2D: causal modules in use, as after the first epoch
                model.prototype_ready.fill_(True)
            rates[name] = train_step_rate(model, probe_batch(batch, size, task, device), precision, cl, steps, warmup)
        return rates
    finally:
        torch.set_num_threads(before)


def reference_variant(name: str) -> str:
    """The variant whose measurement sets ``name``'s execution setting: the main model of the paper file that
    registers it (a model and its ablations share one setting, so their comparison stays controlled), else
    itself."""
    from aurecog import config as C

    variants = C.model_variants()
    v = variants.get(name)
    if v is None:
        return name
    mains = [n for n, x in variants.items() if x["file"] == v["file"] and x["main"]]
    return mains[0] if mains else name


def _probe_config(cfg: dict) -> dict:
    """``cfg`` with the model of its :func:`reference_variant` (same data size, batch and trainer)."""
    from aurecog import config as C

    ref = reference_variant(cfg["model"]["name"])
    if ref == cfg["model"]["name"] or "dataset" not in cfg or "profile" not in cfg:
        return cfg
    base = C.resolve(ref, cfg["dataset"], cfg["profile"])
    return C.deep_merge(base, {"data": {k: cfg["data"][k] for k in ("input_size", "batch_size")},
                               "trainer": cfg.get("trainer") or {}})


def _key(cfg: dict, threads: int) -> str:
    d = cfg["data"]
    return f"{cfg['model']['name']}|{d['input_size']}|{d['batch_size']}|threads {threads}"


def choose(rates: dict[str, float], precision, channels_last) -> str:
    """Fastest candidate compatible with the explicit part of the request, if >= MIN_GAIN x fp32 (else the
    request's fp32 form). ``precision``/``channels_last``: a value or ``auto``."""
    from aurecog.models.probe import SETTINGS

    ok = {n: r for n, r in rates.items()
          if (precision == AUTO or SETTINGS[n][0] == precision) and (channels_last == AUTO or SETTINGS[n][1] ==
                                                                       bool(channels_last))}
    base = next(n for n in ("fp32", "fp32-cl", "bf16", "bf16-cl") if n in ok)
    best = max(ok, key=ok.get)
    return best if ok[best] >= MIN_GAIN * ok[base] else base


def resolve(cfg: dict, threads: int, remeasure: bool = False, cache: Path | None = None) -> dict:
    """``{"precision": ..., "channels_last": ...}`` for ``cfg`` (its auto parts chosen by measurement) and the
    measurement used (``rates``, images/s per setting); measured once per machine and variant."""
    from aurecog.models.probe import SETTINGS

    t = cfg.get("trainer") or {}
    precision, cl = t.get("precision", "32-true"), t.get("channels_last", False)
    if cl not in (True, False, AUTO):
        raise ValueError(f"trainer.channels_last must be true, false or auto, got {cl!r}")
    if precision not in (AUTO, "32-true", "bf16-mixed") and (precision == AUTO or cl == AUTO):
        raise ValueError(f"trainer.precision={precision!r} cannot be combined with channels_last=auto; "
                         "use 32-true, bf16-mixed or auto")
    if precision != AUTO and cl != AUTO:
        return {"precision": precision, "channels_last": bool(cl)}
    cfg = _probe_config(cfg)
    cache = Path(cache or CACHE)
    cache.parent.mkdir(parents=True, exist_ok=True)
    mk, key = machine_key(), _key(cfg, threads)
    with FileLock(str(cache) + ".lock"):
        doc = json.loads(cache.read_text()) if cache.exists() else {}
        entry = doc.get(mk, {}).get(key)
        if entry is None or remeasure:
            t0 = time.time()
            entry = {"rates": _measure(cfg, threads), "measured_s": round(time.time() - t0, 1),
                     "date": time.strftime("%Y-%m-%d")}
            doc.setdefault(mk, {})[key] = entry
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
            os.replace(tmp, cache)
    name = choose(entry["rates"], precision, cl)
    return {"precision": SETTINGS[name][0], "channels_last": SETTINGS[name][1], "setting": name,
            "rates": entry["rates"]}
