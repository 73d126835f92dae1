"""Recipes: a config in, a run out. `config` parses and checks the `hf-memlm train` YAML (jsonargparse),
`train` prepares and runs the training, `final_eval` evaluates the saved model, `defaults` holds the
embedded tiny architecture. Built on the payload and the library (`data`, `training`, `evaluation`);
the command line (`hf_memlm.cli`) only parses arguments and prints.
"""
