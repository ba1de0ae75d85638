"""The methods: log-probabilities, DPO, SFT, policy gradient with rollouts (RLOO, online DPO), best-of-N and the
evaluation they report. Imports training, dataset, model, formats and the shared leaves."""
