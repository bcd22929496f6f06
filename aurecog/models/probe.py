"""Stand-in inputs for measuring a model without a dataset, and the training-step rate under an execution
setting (precision x memory format). Used by the runner's speed choice (:mod:`aurecog.runner.speed`) and the
benchmarks under ``benchmarks/``; one place so both time the same step.

The step is forward + a squared-logit loss + backward + an SGD step: the shape of a training step without the
family's loss (whose cost is small next to the network's) and without data loading.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn

from aurecog.tasks import TaskSpec, TrainStats

#: execution settings: name -> (Lightning precision, channels_last)
SETTINGS = {"fp32": ("32-true", False), "fp32-cl": ("32-true", True), "bf16": ("bf16-mixed", False),
            "bf16-cl": ("bf16-mixed", True)}


def probe_stats(task: TaskSpec, n_conf: int = 27) -> TrainStats:
    """Training statistics of a made-up training set (30% prevalence, ``n_conf`` confounder strata)."""
    c = task.num_outputs
    corr = torch.eye(c) * 0.5 + 0.5 * torch.ones(c, c) * 0.1
    corr.fill_diagonal_(1.0)
    return TrainStats(n_train=1000, label_rate=[0.3] * c, n_pos=[300] * c, n_neg=[700] * c,
                      label_corr=corr.tolist(), subjects=[f"S{i}" for i in range(n_conf)],
                      subject_counts=[10] * n_conf, confounder="subject",
                      confounders=[f"S{i}" for i in range(n_conf)], confounder_counts=[10] * n_conf)


def probe_batch(b: int, size: int, task: TaskSpec, device="cpu") -> dict:
    """A random batch with every key the families read (image, landmarks, targets, subject/confounder ids)."""
    c = task.num_outputs
    g = torch.Generator().manual_seed(0)
    lm = torch.rand(b, 68, 2, generator=g) * size * 0.6 + size * 0.2
    target = (torch.rand(b, c, generator=g) < 0.3).float() if task.kind == "au" else torch.randint(0, c, (b,))
    batch = {"image": torch.randn(b, 3, size, size, generator=g), "landmarks": lm, "target": target,
             "au": target if task.kind == "au" else torch.zeros(b, 12), "subject": torch.zeros(b, dtype=torch.long),
             "train_subject": torch.arange(b) % 27, "confounder": torch.arange(b) % 27,
             "sample": torch.arange(b), "source": torch.zeros(b, dtype=torch.long),
             "flipped": torch.zeros(b, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_rate(model: nn.Module, batch: dict, precision: str = "32-true", channels_last: bool = False,
                    steps: int = 5, warmup: int = 2) -> float:
    """Training images/s of ``model`` on ``batch`` under ``precision`` (``32-true`` or ``bf16-mixed``, as
    Lightning's autocast) and memory format; warm-up excluded. The model's weights change (SGD, tiny lr)."""
    device = batch["image"].device
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16") else nullcontext()

    def step():
        with amp:
            loss = model(batch)["logits"].float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch["image"].shape[0] / (time.perf_counter() - t)
