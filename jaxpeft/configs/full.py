"""Full fine-tuning: every weight trains, at a usual BERT fine-tuning rate with weight decay."""

from jaxpeft.configs import for_task


def get_config(task: str) -> dict:
    return for_task(task, "module", dict(learning_rate=5e-5, weight_decay=0.01),
                    # 1e-4: best of 2e-5 / 5e-5 / 1e-4 on SST-2 (docs/results.md, "The grid")
                    sst2=dict(learning_rate=1e-4),
                    # 1e-4 at 5 epochs: 29.5 +- 2.3 over 3 seeds, the peer 27.2 +- 3.2 (docs/results.md)
                    cola=dict(learning_rate=1e-4, num_epochs=5),
                    # 5 epochs suffice where the small methods take 10 (docs/results.md, "Every method's defaults")
                    mrpc=dict(num_epochs=5), stsb=dict(num_epochs=5))
