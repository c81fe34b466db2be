# The demo stack's application image (docker-compose.yml: migrate, worker, producer).
# Installs the package with its PostgreSQL driver and Celery's Redis transport, plus the example
# stack code (examples/stack). Runs as an unprivileged user.
FROM python:3.11.15-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# The package first (its layer changes less often than the examples).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[postgresql]" "celery[redis]"

COPY examples ./examples

RUN useradd --system --uid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin app
# The spool directory the app services share (a named volume takes this owner and mode).
RUN install -d -o 10001 -g 10001 -m 0700 /var/spool/otel-celery-publish
USER 10001:10001

CMD ["python", "-m", "examples.stack.producer"]
