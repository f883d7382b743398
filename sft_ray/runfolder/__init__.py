"""The run folder, phase 1's output and phase 2's input: both read it here, neither imports the other.

- :mod:`~sft_ray.runfolder.layout`: every file and folder name, defined once
- :mod:`~sft_ray.runfolder.manifest`: ``run.json`` and the fingerprint a resume must match
- :mod:`~sft_ray.runfolder.state`: what the folder holds (samples done, failures to retry)
- :mod:`~sft_ray.runfolder.completion`: completion counted from that state, the failure budget,
  the exit codes, and where each prompt stands under rejection sampling
- :mod:`~sft_ray.runfolder.parts`: the part writers of ``rollouts/`` and ``failed/``
- :mod:`~sft_ray.runfolder.journal`: what generation actors got but the driver has not written yet
- :mod:`~sft_ray.runfolder.lock`: one run at a time in a folder
"""
