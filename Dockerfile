# Image of every host of the docker compose testbed (see docker-compose.yml).
FROM debian:12
WORKDIR /app
COPY . /app
RUN bash scripts/install.sh && ln -s /app/.venv/bin/python3 /usr/local/bin/python3
