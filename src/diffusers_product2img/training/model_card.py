"""The model card (README.md) written next to a trained Product2Img model, and the Hub upload.

The card names the base model, the training data, the hyper-parameters and shows the validation
grid. Hyper-parameters are filtered: anything that looks like a credential (``hub_token``, keys
with ``token``/``secret``/``password``/``api_key`` in their name, values starting with ``hf_``) is
never written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["redact_hyperparameters", "render_model_card", "save_model_card", "push_output_to_hub"]

_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential|auth", re.IGNORECASE)
_NOT_SECRET = {"background_token"}  # the name of the learned text token, not a credential
_SECRET_VALUE = re.compile(r"^(hf_|sk-|api_)[A-Za-z0-9_\-]{8,}$")

TEMPLATE = """
# Product2Img{% if model_name %}: {{ model_name }}{% endif %}

A Product2Img model ("Product2Img: Prompt-Free E-commerce Product Background Generation with Diffusion
Model and Self-Improved LMM", ACM MM 2024): {{ base_model }} fine-tuned to generate the
background of an e-commerce product photo from the product cutout and the product **name** alone
(the text is `"{product name} {{ background_token }}"`, no prompt writing).

{% if lora -%}
The UNet{% if text_encoder_lora %} and the text encoder{% endif %} were trained as LoRA adapters
(`pytorch_lora_weights.safetensors`); the folder also holds the base weights with the learned
`{{ background_token }}` embedding.
{% else -%}
All UNet weights, the `{{ background_token }}` embedding and the rest of the text encoder were trained.
{% endif -%}
Training objective: the inpainting loss{% if cba %} plus Contrastive Background Alignment (CBA, weight
{{ cba_weight }}, temperature {{ cba_temperature }}){% else %} only (no CBA: the EPBD-FT baseline){% endif %}.

## Use

```python
from PIL import Image
from diffusers_product2img import Product2ImgPipeline

pipe = Product2ImgPipeline.from_pretrained("{{ repo_id or 'path/to/this/folder' }}").to("cuda")
{%- if lora %}
pipe.load_lora_weights("{{ repo_id or 'path/to/this/folder' }}")
{%- endif %}
image = pipe("Ceramic Coffee Mug 350ml Matte Black", Image.open("mug_cutout.png")).images[0]
```

or with diffusers alone (`pip install diffusers-product2img` for the pipeline class):
`DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo, trust_remote_code=True)`.
`learned_embeds.safetensors` holds the `{{ background_token }}` token for `load_textual_inversion`.

## Training

- Base model: `{{ base_model }}`
- Training data: {{ dataset }}{% if num_examples %} ({{ num_examples }} examples){% endif %}
{% if cba %}- CBA image encoder: `{{ clip_model }}`; projection in `cba_projection/`
{% endif %}
| hyper-parameter | value |
|---|---|
{% for key, value in hyperparameters.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% if validation_grid %}
## Validation

![validation grid]({{ validation_grid }})

Validation products{% if validation_names %}: {{ validation_names | join(", ") }}{% endif %}.
{% endif %}
"""


def redact_hyperparameters(hyperparameters: Mapping) -> dict:
    """Drop credentials and anything that is not a plain value from a hyper-parameter mapping."""
    clean = {}
    for key, value in hyperparameters.items():
        if _SECRET_KEY.search(str(key)) and str(key) not in _NOT_SECRET:
            continue
        if isinstance(value, str) and _SECRET_VALUE.match(value.strip()):
            continue
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            clean[str(key)] = value
        elif isinstance(value, (list, tuple)):
            clean[str(key)] = ", ".join(map(str, value))
    return clean


def render_model_card(
    *,
    base_model: str,
    dataset: str,
    hyperparameters: Mapping,
    background_token: str = "<background>",
    cba: bool = True,
    cba_weight: float | None = None,
    cba_temperature: float | None = None,
    clip_model: str | None = None,
    lora: bool = False,
    text_encoder_lora: bool = False,
    validation_grid: str | None = None,
    validation_names: list[str] | None = None,
    num_examples: int | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = "creativeml-openrail-m",
):
    """A :class:`huggingface_hub.ModelCard` for a trained model."""
    from huggingface_hub import ModelCard, ModelCardData
    from jinja2 import Template

    is_hub_dataset = bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", dataset or "")) and not os.path.exists(dataset)
    data = ModelCardData(
        license=license,
        library_name="diffusers",
        base_model=base_model if not os.path.exists(base_model) else None,
        datasets=[dataset] if is_hub_dataset else None,
        tags=["diffusers", "product2img", "stable-diffusion", "inpainting", "background-generation", "e-commerce"]
        + (["lora"] if lora else []),
        pipeline_tag="image-to-image",
    )
    body = Template(TEMPLATE).render(
        base_model=base_model, dataset=dataset, hyperparameters=redact_hyperparameters(hyperparameters),
        background_token=background_token, cba=cba, cba_weight=cba_weight, cba_temperature=cba_temperature,
        clip_model=clip_model, lora=lora, text_encoder_lora=text_encoder_lora, validation_grid=validation_grid,
        validation_names=validation_names, num_examples=num_examples, repo_id=repo_id, model_name=model_name,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def save_model_card(output_dir: str | os.PathLike, **kwargs) -> Path:
    """Render the card and write ``output_dir/README.md`` atomically."""
    path = Path(output_dir) / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(str(render_model_card(**kwargs)), encoding="utf-8")
    os.replace(tmp, path)
    return path


#: What a training output folder holds that does not belong on the Hub (resumable state, logs).
OUTPUT_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "validation/**", ".*"]


def push_output_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Product2Img training output",
    api=None,
):
    """Upload a training output folder (not its checkpoints or logs) to a Hub model repo."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), revision=revision, commit_message=commit_message,
        ignore_patterns=OUTPUT_IGNORE_PATTERNS,
    )
