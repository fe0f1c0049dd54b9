"""Fault injection for trainer tests: a hook for `train(before_step=...)` that dies at a step."""


class Killed(Exception):
    pass


def kill_at(step_to_die: int):
    """before_step hook raising Killed before optimizer step `step_to_die` (0-based)."""
    def hook(step, _model):
        if step == step_to_die:
            raise Killed()
    return hook
