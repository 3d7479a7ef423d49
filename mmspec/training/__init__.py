"""Training recipes: draft heads (EAGLE for LMs and LlamaGen, vision-aware VLM heads; one loop in
:mod:`mmspec.training.loop`) and the embedded reference models. Recipes import pipelines; pipelines
and the engine never import this package."""
