from setuptools import find_packages, setup

setup(
    name="diffusers-product2img",
    version="0.1.0.dev0",
    description=(
        "Product2Img (ACM MM 2024) for diffusers: prompt-free e-commerce product backgrounds "
        "from a cutout and a product name, with Contrastive Background Alignment and IDR-LMM."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_product2img": ["assets/*", "idr/prompts/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.42,<0.43",
        "transformers>=5.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=2.0",
        "pillow>=10",
        "numpy>=1.24",
        "tqdm",
    ],
    extras_require={
        "train": ["datasets>=5.0", "peft>=0.17", "tensorboard", "matplotlib", "jinja2"],
        "score": ["openai>=3.0", "pydantic>=2"],
        "metrics": ["scipy"],
        "test": [
            "pytest",
            "ruff",
            "datasets>=5.0",
            "peft>=0.17",
            "openai>=3.0",
            "pydantic>=2",
            "scipy",
            "tensorboard",
            "matplotlib",
            "jinja2",
        ],
    },
    entry_points={"console_scripts": ["product2img=diffusers_product2img.cli:main"]},
)
