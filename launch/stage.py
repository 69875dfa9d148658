"""Per-rank script for launchers that want a file path rather than a module:

    deepspeed --num_gpus 8 launch/stage.py dpo recipes/llama3.1-8b.yaml --direction helpful+
    srun python launch/stage.py sft recipes/llama3.1-8b.yaml
    mpirun -np 2 python launch/stage.py ref-logps recipes/quickstart.yaml --preference helpful
"""

from prefvec_ds.entry import main

if __name__ == "__main__":
    main()
