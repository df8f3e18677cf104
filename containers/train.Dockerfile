# bidir-train: contrastive fine-tuning under torchrun + FSDP2.
# Base: NVIDIA's PyTorch image (CUDA, cuDNN, NCCL and a tuned torch). Its torch is kept: our wheels are installed
# under a constraint that pins torch to the version already in the image, so pip never replaces it.
#
#   docker build -f containers/train.Dockerfile -t bidir-train .
# Its torch is 2.9.0a0+145a3a7bda.nv25.10 (NVIDIA's PyTorch release notes for 25.10), a pre-release of 2.9.0:
# every bidir package's torch requirement admits it (tools/tests/test_containers.py checks, per base tag).
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3

FROM ${BASE} AS wheels
WORKDIR /src
COPY packages/core packages/core
COPY packages/train packages/train
RUN python -m pip wheel --no-deps --wheel-dir /wheels ./packages/core ./packages/train

FROM ${BASE}
COPY --from=wheels /wheels /wheels
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
    && python -m pip install --no-cache-dir -c /tmp/keep-torch.txt /wheels/bidir_core-*.whl /wheels/bidir_train-*.whl \
    && rm -rf /wheels /tmp/keep-torch.txt
WORKDIR /workspace
# torchrun is the entrypoint, so `docker run ... bidir-train --nnodes 2 ... -m bidir_train --config X` passes
# torchrun options first; the default runs the default recipe on every GPU of the machine.
ENTRYPOINT ["torchrun"]
CMD ["--nproc-per-node", "gpu", "-m", "bidir_train", "--config", "default"]
