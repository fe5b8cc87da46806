"""groupvit-jax: GroupViT pretraining and zero-shot segmentation in JAX/Flax."""

import setuptools

# Versions that install together on a fresh Python 3.11 machine (checked 2026-11-22).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow==2.21.0",  # tf.data only; tensorflow-text needs the full package, not tensorflow-cpu.
    "tensorflow-text==2.21.1",
    "tensorboard==2.21.0",  # clu's metric writers need it; TF 2.21 no longer pulls it in.
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==12.3.0",  # gradio (the page) needs pillow<13.
    "ftfy==6.3.1",
    "regex==2026.5.9",
    "safetensors==0.8.0",
    "importlib-resources==7.1.0",  # tensorflow-datasets 4.9.10 imports it without requiring it.
    "scikit-image==0.26.0",  # Felzenszwalb superpixels (the superpixels pp op).
    "scipy==1.17.1",  # the page numbers groups at their innermost pixel (distance transform).
    "textblob==0.20.1",  # offline POS tagger: builds the noun lexicon, precomputes nouns in shard conversion.
]

EXTRAS = {
    "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "filelock==4.2.11", "selenium==4.51.0", "gradio==6.31.0"],
    # The page (python -m groupvit_jax.app).
    "app": ["gradio==6.31.0"],
    # Reference implementations and .pth reading: tests, benchmarks and weight conversion only.
    "torch": ["torch==2.13.0", "transformers==5.23.0"],
    "bench": ["torch==2.13.0", "transformers==5.23.0"],
    # For Cloud TPU VMs (libtpu comes from Google's index there; not installable on this CPU index).
    "tpu": ["jax[tpu]==0.10.2"],
    "gpu": ["jax[cuda12]==0.10.2"],
}

setuptools.setup(
    name="groupvit-jax",
    version="0.1.0",
    description="GroupViT pretraining and zero-shot semantic segmentation in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["groupvit_jax", "groupvit_jax.*"]),
    package_data={"groupvit_jax": ["pp/assets/*", "cpu_allocator.env"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
