#!/bin/bash

cd /work/main/benchmarks/results/time_to_accuracy/mlp_4ranks_2026-11-29b/kfac_fast/20261129_154324_kfac_fast || exit 1
export KFAC_LAUNCHED=1
export PYTHONUNBUFFERED=1
echo "Started at $(date)"
/work/main/.venv/bin/mpiexec -n 4 /work/main/.venv/bin/python -m mpi4py /work/main/kfac.py model=mlp model=mlp experiment=kfac_fast kfac.enabled=true launcher.nodes=1 launcher.procs_per_node=4 trainer.epochs=10 trainer.test_every_steps=100 trainer.stop_at_test_accuracy=98.0 trainer.progress=false launcher.experiment_dir=benchmarks/results/time_to_accuracy/mlp_4ranks_2026-11-29b/kfac_fast launcher.job_name=kfac_fast hydra.run.dir=/work/main/benchmarks/results/time_to_accuracy/mlp_4ranks_2026-11-29b/kfac_fast/20261129_154324_kfac_fast hydra.output_subdir=null
status=$?
echo "Finished at $(date) with status $status"
exit $status
