"""Pipeline stages: read/decode, backbones, embed, write."""
