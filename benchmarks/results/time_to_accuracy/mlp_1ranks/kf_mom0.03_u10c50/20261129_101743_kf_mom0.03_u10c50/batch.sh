#!/bin/bash

cd /work/main/benchmarks/results/time_to_accuracy/mlp_1ranks/kf_mom0.03_u10c50/20261129_101743_kf_mom0.03_u10c50 || exit 1
export KFAC_LAUNCHED=1
export PYTHONUNBUFFERED=1
echo "Started at $(date)"
/work/main/.venv/bin/python /work/main/kfac.py model=mlp optimizer=momentum optimizer.learning_rate=0.03 kfac.enabled=true 'kfac.damping_act=[0.01]' 'kfac.damping_err=[1.0]' kfac.update_interval_init=10 kfac.update_interval_target=10 kfac.compute_interval_steps=50 launcher.nodes=1 launcher.procs_per_node=1 trainer.epochs=3 trainer.test_every_steps=100 trainer.stop_at_test_accuracy=98.0 trainer.progress=false launcher.experiment_dir=/work/main/benchmarks/results/time_to_accuracy/mlp_1ranks/kf_mom0.03_u10c50 launcher.job_name=kf_mom0.03_u10c50 hydra.run.dir=/work/main/benchmarks/results/time_to_accuracy/mlp_1ranks/kf_mom0.03_u10c50/20261129_101743_kf_mom0.03_u10c50 hydra.output_subdir=null
status=$?
echo "Finished at $(date) with status $status"
exit $status
