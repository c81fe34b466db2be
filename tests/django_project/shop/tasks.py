"""Tasks registered only here (autodiscovered): a replay must import this module to find them."""

from celery import shared_task

from shop.models import Order


@shared_task(name="shop.add")
def add(x: int, y: int) -> int:
    return x + y


@shared_task(name="shop.mark_paid")
def mark_paid(order_id: int) -> bool:
    """True when the order exists (its transaction committed) and is now paid."""
    return Order.objects.filter(id=order_id).update(paid=True) == 1
