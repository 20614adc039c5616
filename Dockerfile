# TorchServe + the refund classifier's handler and jobs. See README "Deployment".
FROM python:3.11.10-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY handler/ handler/
COPY ingest/ ingest/
COPY serving/ serving/
COPY training/ training/
COPY config.properties .

RUN useradd --create-home --uid 10001 refund && mkdir -p model_store .run && chown -R refund /app/model_store /app/.run
USER refund
VOLUME ["/app/model_store"]
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD curl -fsS http://127.0.0.1:8080/ping || exit 1
CMD ["python", "-m", "serving", "up", "--foreground"]
