# GPU image of the recipe: NVIDIA's PyTorch container brings CUDA, NCCL, torch and Transformer Engine.
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/recipe
COPY requirements.txt .
# Keep the container's own CUDA build of torch (and TE): install everything else from requirements.txt.
RUN grep -v '^torch==' requirements.txt > /tmp/requirements-no-torch.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements-no-torch.txt

COPY . .
# Corpus indices go to $XDG_CACHE_HOME/geneformer-recipe: mount /cache (and /workspace/recipe/outputs) to keep them.
ENV PYTHONUNBUFFERED=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    XDG_CACHE_HOME=/cache
# `docker run --gpus all IMAGE` runs the sanity distillation; pass any command to run something else.
CMD ["python", "distill.py", "--config-name", "l0_sanity"]
