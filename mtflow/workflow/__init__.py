"""The user's workflow around training: build training chains (``mtflow data build-chains``), try a model on
one's own image (``mtflow edit``), look at runs (``mtflow runs``) and share a LoRA (``mtflow export
--push_to_hub``)."""
