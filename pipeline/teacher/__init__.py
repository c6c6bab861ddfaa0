"""The teacher: a model run in fixed-size blocks so its logits do not depend on the batch size."""

from kdcache.teacher.runner import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher"]
