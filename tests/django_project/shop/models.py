from django.db import models


class Order(models.Model):
    """A row the tasks look for: committed, or rolled back with the transaction that made it."""

    name = models.CharField(max_length=100)
    paid = models.BooleanField(default=False)
