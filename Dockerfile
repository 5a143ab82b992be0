# The task service: gunicorn (one worker process, threads) as PID 1.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY app.py config.py gunicorn.conf.py healthcheck.py run_gunicorn.py server_settings.py openapi.yaml ./
COPY service/ service/
COPY workerpool/ workerpool/
# TASK_HANDLER modules of this deployment (TASK_HANDLER=handlers.<module>:<callable>).
COPY handlers/ handlers/

# A numeric user, which Kubernetes' runAsNonRoot can check without reading the image's /etc/passwd. /data is its
# own, for the SQLite store on a volume (STORE=sqlite:///data/tasks.db): a named volume takes that owner.
RUN groupadd --system --gid 10001 workerpool \
    && useradd --system --uid 10001 --gid 10001 --no-create-home workerpool \
    && mkdir /data && chown 10001:10001 /data
USER 10001:10001

EXPOSE 8080
# gunicorn drains on SIGTERM; keep `docker stop -t` above SHUTDOWN_TIMEOUT_S + 10.
STOPSIGNAL SIGTERM
# /healthz of the address the server listens on (the first -b in GUNICORN_CMD_ARGS, else HOST and PORT, from the
# environment or else a mounted .env), under the root path, asked directly: proxies from the environment (http_proxy,
# which Docker may pass) are not used.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["python", "healthcheck.py"]
# Exec form: run_gunicorn.py checks the variables gunicorn reads itself (WEB_CONCURRENCY...), then becomes
# `gunicorn -c gunicorn.conf.py`, which is PID 1 and receives the stop signal itself.
CMD ["python", "run_gunicorn.py"]
