"""The YAML configs, installed with the package as ``mtflow.configs`` (so ``mtflow fit`` finds its default,
``toy.yaml``, in a wheel install too). Nothing to import here."""
