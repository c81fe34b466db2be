from _conf import conf
from celery import Celery

app = Celery("imports_app", **conf())
app.conf.update(imports=("imports_app.jobs",), broker_connection_retry_on_startup=True)
