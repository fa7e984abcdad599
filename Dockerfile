# `llmcore serve` in a container: the Ollama API (/api), the OpenAI API (/v1) and the chat page (/) on port 11434.
#
#   docker build -t llmcore .
#   docker run --rm -p 127.0.0.1:11434:11434 -v "$PWD/data/models/instruct:/models/instruct:ro" llmcore
#
# Other models: mount them under /models and pass the arguments of `llmcore serve`, e.g.
#   docker run ... -v "$PWD/data/models:/models:ro" llmcore --model /models/instruct --model /models/pretrain --name instruct --name base
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU torch first, from PyTorch's CPU index: a bare `torch` from PyPI would pull the multi-GB CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY llmcore ./llmcore
RUN pip install --no-cache-dir "/app[serve]" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin llmcore

USER 10001
EXPOSE 11434
VOLUME ["/models"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11434/api/version', timeout=4)"]

# Inside the container the server must listen on all interfaces; publish the port on 127.0.0.1 (as above) to keep
# it local to the host.
ENTRYPOINT ["llmcore", "serve", "--host", "0.0.0.0", "--port", "11434"]
CMD ["--model", "/models/instruct"]
