import ocp_not_installed  # noqa: F401 - the dependency this deployment forgot
from celery import shared_task


@shared_task
def add(x: int, y: int) -> int:
    return x + y
