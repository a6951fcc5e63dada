"""Scoring models: held-out LM loss / perplexity, and lm-eval tasks run on the in-memory model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from nas.errors import NasError
from nas.files import cache_dir
from nas.importance import lm_loss

TASKS_DIR = Path(__file__).parent / "tasks"


def heldout(model: nn.Module, tokens: Tensor, batch_size: int = 8) -> dict[str, float]:
    loss = lm_loss(model, tokens, batch_size)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens.numel())}


def task_manager(tasks: list[str]):
    """lm-eval's task registry plus the tasks shipped with nas (their data paths made absolute). lm-eval's own
    thousands of tasks are indexed (tens of seconds on a CPU) only when `tasks` asks for one that nas does not ship."""
    from lm_eval.tasks import TaskManager

    folder = cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for yaml in TASKS_DIR.glob("*.yaml"):
        (folder / yaml.name).write_text(yaml.read_text().replace("NAS_TASKS_DIR", str(TASKS_DIR.resolve())))
    shipped = TaskManager(include_path=str(folder), include_defaults=False)
    return shipped if set(tasks) <= set(shipped.all_tasks) else TaskManager(include_path=str(folder))


def lm_eval_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], limit: int | None = None,
                  batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model; {task: {metric: value}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise NasError(f"--tasks {','.join(unknown)}: unknown lm-eval task(s); nas ships 'nas_cloze'")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
