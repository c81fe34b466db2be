import os

from _conf import conf
from celery import Celery

if os.environ.get("OCP_BROKEN_BY") == "autodiscover":
    app = Celery("broken", **conf())
    app.autodiscover_tasks(["broken.pkg"])
else:
    app = Celery("broken", include=["broken.pkg.tasks"], **conf())
