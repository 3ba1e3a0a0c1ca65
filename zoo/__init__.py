"""DIN's model zoo: the models a stack serves, built deterministically from data that ships with Python.

* ``zoo.build``: ``build_zoo`` trains and exports every model into a model
  repository (ONNX files, each model's ``ModelConfigV1`` and the held-out split)
  and skips an identical rebuild;
* ``zoo.digits``: the digit classifiers (scikit-learn, exported with skl2onnx);
* ``zoo.text``: the character-level GRU with explicit state, trained in numpy;
* ``zoo.split``: cutting an ONNX graph into a head and a tail at a tensor;
* ``zoo.inversion``: the model-inversion attack that measures what a split
  point's intermediate gives away.

The services only read what this package writes (``shared.contracts.model_config``).
"""
