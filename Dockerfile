# The embedded default served on CPU, the API on port 8000 with auth on (off loopback keys are required):
#   docker build -t ray-suti:cpu .
#   docker run -p 8000:8000 -e SUTI_API_TOKEN=$(openssl rand -hex 16) -v suti-subjects:/data ray-suti:cpu
# The GPU image (Ray's CUDA base, for clusters) is k8s/Dockerfile.
FROM python:3.11.7-slim
WORKDIR /app
# torch from the CPU wheel index first, so pip does not pull the CUDA build; then the project's pins
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY ray_suti ray_suti
COPY serve serve
COPY checkpoints/tiny-32.safetensors checkpoints/tiny-32.safetensors
RUN pip install --no-cache-dir .
ENV OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled
EXPOSE 8000
VOLUME /data
CMD ["ray-suti", "serve", "--host", "0.0.0.0", "--port", "8000", "--checkpoint", "checkpoints/tiny-32.safetensors", "--store", "/data/subjects", "--replicas", "1"]
