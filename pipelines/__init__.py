"""Diffusers-style pipelines, one folder per model family (installed as ``mmspec.pipelines``)."""
