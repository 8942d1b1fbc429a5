"""torchtune's import path for the CLIP positional embeddings (``torchtune.models.clip._position_embeddings``).

The classes live in :mod:`mmtrain.modules.position_embeddings`; code written against torchtune's path imports
the same objects from here. Shapes are documented there.
"""

from mmtrain.modules.position_embeddings import (
    TiledTokenPositionalEmbedding,
    TilePositionalEmbedding,
    TokenPositionalEmbedding,
)

__all__ = ["TilePositionalEmbedding", "TiledTokenPositionalEmbedding", "TokenPositionalEmbedding"]
