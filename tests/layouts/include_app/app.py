from _conf import conf
from celery import Celery

app = Celery("include_app", include=["include_app.tasks"], **conf())
app.conf.broker_connection_retry_on_startup = True
