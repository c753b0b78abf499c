"""The files of a run folder: ``unhans train`` writes them; audit, export, aclarc and the serving archive read them.

Its own module, with nothing imported, so that reading a name does not load torch (core.training does), as
audit/samples.py does for the samples file.
"""

MODEL_FILE = "model.py"  # the model's source, TorchServe-style: one nn.Module class whose defaults build the trained shape
WEIGHTS_FILE = "weights.pt"  # its state_dict
DATASET_FILE = "dataset.npz"  # the (poisoned) training set, clean test set and attacked test set (core.poison.save_scenario)
METRICS_FILE = "metrics.json"  # clean accuracy and attack success, as measured after training
