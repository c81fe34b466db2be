from celery import shared_task


@shared_task(name="billing.total")
def total(cents: int, fee: int) -> int:
    return cents + fee
