"""Recipes: a config in, a run out. `config` parses and checks the `hf-memlm train` YAML (jsonargparse),
`train` prepares and runs the training, `comparison` plans the models trained beside it and compares them by
perplexity, `final_eval` evaluates the saved model, `pipeline` runs prepare → train → compare → evaluate →
publish in order (the only module that imports the others), `defaults` holds the embedded tiny architecture.
Built on the payload and the library (`data`, `training`, `evaluation`, `integrations`); the command line
(`hf_memlm.cli`) only parses arguments and prints.
"""
