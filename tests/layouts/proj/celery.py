from _conf import conf
from celery import Celery

app = Celery("proj", **conf())
app.conf.broker_connection_retry_on_startup = True
app.autodiscover_tasks(["proj.orders", "proj.billing"])
