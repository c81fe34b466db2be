_instruments = ("celery >= 5.3, < 6.0",)
