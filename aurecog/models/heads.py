"""Output heads shared by the models."""

from __future__ import annotations

from torch import Tensor, nn

from aurecog.tasks import TaskSpec


class TaskHead(nn.Module):
    """Feature (B, D) -> task logits: B x C (au), B x C x levels (intensity), B x K (expression).

    ``hidden`` inserts one hidden layer (CISNet's 512 -> 64 -> C classifier with LeakyReLU).
    """

    def __init__(self, in_dim: int, task: TaskSpec, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.task = task
        out = task.num_outputs * (task.levels if task.kind == "intensity" else 1)
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, out)]
        else:
            layers.append(nn.Linear(in_dim, out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        if self.task.kind == "intensity":
            y = y.view(x.shape[0], self.task.num_outputs, self.task.levels)
        return y
