"""SynthAU trunk pretraining (issue 17): a disjoint pretraining preset, committed trunk weights that every quick
model loads completely, the weights in the cell identity, and a missing file stopping before any cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.resnet import ResNet

from aurecog import config as C
from aurecog.data import synth
from aurecog.models import backbones as B
from aurecog.models.ac2d import AC2DNet, load_pretrained_net
from aurecog.models.registry import build_model
from aurecog.runner import identity as I
from aurecog.tasks import TaskSpec, TrainStats

PRETRAINED = C.REPO_ROOT / B.SYNTH_PRETRAINED_DIR


def _identities(preset: str) -> dict[str, synth.Identity]:
    """Subject name -> identity as :func:`synth._plan` draws it (same RNG keys), without drawing the sessions."""
    pre = synth.get_preset(preset)
    out = {}
    for s_idx, src in enumerate(pre.fer_sources or (None,)):
        n_sub = max(1, round(pre.n_subjects * src.share)) if src else pre.n_subjects
        for i in range(n_sub):
            family = synth.HABIT_GROUPS[synth.habit_group_of(i, n_sub, pre.contrarians_per_fold)].family
            ident = synth.sample_identity(synth._rng(pre.name, 0, s_idx, i, 0), family, pre.identity_shift)
            out[f"{src.prefix if src else pre.subject_prefix}{i + 1:03d}"] = ident
    return out


def _values(idents) -> set[float]:
    """Every continuous identity parameter (face shape, skin, hair; the backdrop colour is quantised to uint8)."""
    out = set()
    for ident in idents:
        out.update(float(v) for v in ident.shape.values())
        out.update(float(v) for v in np.concatenate([ident.skin, ident.hair]))
    return out


def test_pretraining_subjects_share_no_identity_parameter_with_any_benchmark_preset():
    # the replication above is the generator's: same subjects and identities as _plan (checked on `synth`)
    planned = {s.subject: s.ident for s in synth._plan(synth.get_preset("synth"), 0)}
    drawn = _identities("synth")
    assert planned.keys() == drawn.keys()
    assert all(planned[k].shape == drawn[k].shape and np.array_equal(planned[k].skin, drawn[k].skin) for k in drawn)
    pre = _identities("synth-pretrain")
    assert len(pre) == synth.PRESETS["synth-pretrain"].n_subjects > synth.PRESETS["synth"].n_subjects
    values = _values(pre.values())
    for preset in synth.PRESETS:
        if preset == "synth-pretrain":
            continue
        other = _identities(preset)
        assert not pre.keys() & other.keys(), preset
        # every draw is keyed by the preset name (crc32 in _rng): no shape or colour value coincides
        common = values & _values(other.values())
        assert not common, (preset, sorted(common)[:5])


def test_pretraining_preset_is_habit_free_with_the_union_of_the_au_presets():
    idx, meta = synth.label_table("synth-pretrain", overrides={"n_subjects": 6})
    union = set(synth.BP4D_AUS) | set(synth.DISFA_AUS) | set(synth.GFT_AUS) | set(synth.AFFWILD2_AUS)
    assert meta["aus"] == [f"AU{a}" for a in sorted(union)]
    assert not idx["habit_active"].any()
    assert all(not h["adds"] and not h["suppresses"] and not h["contrarian"] for h in meta["habits"].values())
    # the benchmark preset keeps its habits (the switch is per preset)
    assert synth.label_table("synth", overrides={"n_subjects": 6})[0]["habit_active"].any()


# ------------------------------------------------------------------------------------------ committed weights
def _quick_cells():
    for name, v in C.model_variants().items():
        dataset = "synth-fermix" if v["file"] == "iern" else "synth"
        yield name, C.resolve(name, dataset, "quick")


def _stats(m: int) -> TrainStats:
    return TrainStats(n_train=100, label_rate=[0.3] * m, n_pos=[30] * m, n_neg=[70] * m,
                      label_corr=np.eye(m).tolist(), subjects=["s"], subject_counts=[100])


def test_every_quick_model_starts_from_a_committed_file_the_paper_profiles_do_not():
    groups: dict[str, set] = {}
    for name, cfg in _quick_cells():
        files = B.pretrained_files(cfg)
        assert len(files) == 1 and all(p.is_file() for p in files.values()), (name, files)
        assert all(p.parent == PRETRAINED for p in files.values()), files
        trunk = (cfg.get("backbone") or {}).get("name", "ac2d")
        groups.setdefault(f"{cfg['model']['family']}:{trunk}", set()).update(files.values())
        paper = C.resolve(name, "synth-fermix" if C.model_variants()[name]["file"] == "iern" else "synth", "paper")
        assert not B.pretrained_files(paper), name  # paper: ImageNet (hub / weights folder), AC2D from scratch
    # one file per trunk: a model and its ablations (e.g. CISNet w/ and w/o CIS of one depth) share it
    assert all(len(f) == 1 for f in groups.values()), groups
    assert {p.name for f in groups.values() for p in f} == {"resnet18.pth", "resnet34.pth", "resnet50.pth", "ac2d.pth"}
    for p in PRETRAINED.glob("*.pth"):
        assert p.stat().st_size < 5e6, p


@pytest.mark.parametrize("family", ["baseline", "cisnet-resnet50", "iern", "renet", "ac2d-bnet"])
def test_the_weights_load_into_the_quick_trunk_with_every_tensor(family):
    """Every trunk tensor comes from the file (strict loading raises on a missing, extra or reshaped key); checked
    here against the file, through each family's own trunk: timm ResNet (IERN dilated), RE-Net's per-AU BNs
    and AC2D's branches (each a copy of the one pretrained branch)."""
    names = [f"AU{a}" for a in synth.BP4D_AUS]
    cfg = dict(C.resolve(family, "synth", "quick"))
    if family == "iern":
        names, cfg = list(synth.FER_EXPRESSIONS), dict(C.resolve(family, "synth-fermix", "quick"))
    task = TaskSpec("expression" if family == "iern" else "au", names)
    torch.manual_seed(0)
    model = build_model(cfg, task, _stats(len(names)))
    (path,) = B.pretrained_files(cfg).values()
    sd = B.read_state_dict(path)
    if family == "ac2d-bnet":
        net = model.net
        for k, v in net.state_dict().items():
            ref = sd[k]
            if k.startswith(("patch3.", "stage3.", "norm.")):
                ref = ref.repeat(net.m, *([1] * (ref.ndim - 1)))
            assert torch.equal(v, ref.to(v.dtype)), k
        return
    trunk = next(m for m in model.modules() if isinstance(m, ResNet))
    own = trunk.state_dict()
    if family == "renet":  # conditional BNs: every AU starts from the pretrained BN (affine and statistics)
        assert set(own) == set(sd)
        per_au = 0
        for k, v in sd.items():
            o, ref = own[k], v.to(own[k].dtype)
            if o.shape != ref.shape and not k.endswith("num_batches_tracked"):
                ref, per_au = ref[None].expand_as(o), per_au + 1
            assert k.endswith("num_batches_tracked") or torch.equal(o, ref), k
        assert per_au >= 4 * 20  # weight, bias, running mean and var of each of ResNet-18's 20 BNs
        return
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], sd[k].to(own[k].dtype)) for k in own)


def test_a_trunk_file_of_another_ac2d_width_is_refused_in_one_line(tmp_path):
    path = tmp_path / "w8.pth"
    torch.save(AC2DNet(1, width=8, depths=(1, 1, 2)).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit the AC2D network") as e:
        load_pretrained_net(AC2DNet(12, width=16, depths=(1, 2, 2)), path)
    assert "\n" not in str(e.value)
    ok = tmp_path / "w16.pth"
    one = AC2DNet(1, width=16, depths=(1, 2, 2))
    torch.save(one.state_dict(), ok)
    many = AC2DNet(3, width=16, depths=(1, 2, 2))
    load_pretrained_net(many, ok)
    x = torch.randn(2, 3, 32, 32)
    f1, _, _ = one.eval().branches(one.trunk(x))
    f3, _, _ = many.eval().branches(many.trunk(x))
    assert torch.allclose(f3, f1.expand_as(f3), atol=1e-5)  # every branch computes the pretrained branch


# --------------------------------------------------------------------------------------------- identity, errors
def _ident(cfg):
    return I.cell_identity(cfg, 0, 0, threads=1, code="c", lock="l", git={"revision": "r", "dirty": False},
                           data="d")


def test_the_weights_file_bytes_are_part_of_the_identity(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    cfg = {"model": {"name": "baseline"}, "trainer": {"accelerator": "cpu"},
           "backbone": {"name": "resnet18", "pretrained_file": str(path)}}
    a = _ident(cfg)
    assert a["weights"] == {"backbone.pretrained_file": B.file_sha256(path)}
    path.write_bytes(b"two")  # same path, same config, other bytes
    b = _ident(cfg)
    assert b["row"] != a["row"] and b["cell"] != a["cell"]
    assert "weights" in I.describe_mismatch(a, b)
    # a cell that loads no file keeps the identity it had before weights were hashed
    plain = {k: v for k, v in cfg.items() if k != "backbone"}
    assert _ident(plain)["weights"] == {}


def test_name_placeholder_and_repo_relative_paths():
    cfg = C.resolve("cisnet-resnet50-wo", "synth", "quick")
    assert B.pretrained_files(cfg) == {"backbone.pretrained_file": PRETRAINED / "resnet50.pth"}
    assert B.resolve_file("pretrained/synthau/{name}.pth", "resnet34") == PRETRAINED / "resnet34.pth"


def test_a_missing_pretrained_trunk_stops_before_any_cell_naming_make_pretrain(tmp_path, capsys):
    from aurecog import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--dataset", "synth", "--models", "ac2d,ac2d-bnet", "--folds", "0", "--results",
                  str(tmp_path / "res"), "--no-leaderboard", "--set", "ac2d.pretrained_file=pretrained/synthau/no.pth"])
    msg = str(e.value)
    assert "make pretrain" in msg and "ac2d.pretrained_file" in msg and "\n" not in msg
    assert not (tmp_path / "res" / "runs").exists()
    cfg = C.resolve("renet", "synth", "quick", overrides={"backbone": {"pretrained_file": "pretrained/synthau/x.pth"}})
    with pytest.raises(B.PretrainedUnavailable, match="run `make pretrain`"):
        B.check_pretrained(cfg)
