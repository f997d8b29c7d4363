"""When a failed task is worth another try: I/O can fail transiently, bad input fails the same way again."""
from __future__ import annotations


def transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: no retry for ValueError (a dataset, params or model file that breaks
    its contract), so the error reaches the user at once instead of after every retry delay."""
    return not isinstance(getattr(state, "data", None), ValueError)


def io_retries(retries: int = 2, delay: float = 5) -> dict:
    return {"retries": retries, "retry_delay_seconds": delay, "retry_condition_fn": transient}
