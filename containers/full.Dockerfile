# bidir, all four packages: train, export, serve in one image (the demo and the integration tests run here).
# Base: NVIDIA's PyTorch image, which also ships TensorRT and its Python bindings. Its torch is kept (see
# train.Dockerfile); onnxruntime is swapped for the GPU build (see serve.Dockerfile).
#
#   docker build -f containers/full.Dockerfile -t bidir .
# Its torch is 2.9.0a0+145a3a7bda.nv25.10 (NVIDIA's PyTorch release notes for 25.10), a pre-release of 2.9.0:
# every bidir package's torch requirement admits it (tools/tests/test_containers.py checks, per base tag).
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3

FROM ${BASE} AS wheels
WORKDIR /src
COPY packages packages
RUN python -m pip wheel --no-deps --wheel-dir /wheels \
    ./packages/core ./packages/train ./packages/export ./packages/serve

FROM ${BASE}
ARG ORT_GPU=onnxruntime-gpu==1.31.1
COPY --from=wheels /wheels /wheels
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
    && python -m pip install --no-cache-dir -c /tmp/keep-torch.txt \
       /wheels/bidir_core-*.whl /wheels/bidir_train-*.whl /wheels/bidir_export-*.whl /wheels/bidir_serve-*.whl \
    && python -m pip uninstall -y onnxruntime \
    && python -m pip install --no-cache-dir --force-reinstall --no-deps "${ORT_GPU}" \
    && rm -rf /wheels /tmp/keep-torch.txt \
    && python -c "import tensorrt, onnxruntime, bidir_train, bidir_export, bidir_serve"
WORKDIR /workspace
CMD ["bash"]
