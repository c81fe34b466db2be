"""An app whose task module cannot be imported: listed in ``include`` or, with
``OCP_BROKEN_BY=autodiscover``, found by ``autodiscover_tasks``."""
