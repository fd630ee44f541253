"""Flax BERT and its loading from Hugging Face checkpoints."""

from jaxpeft.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jaxpeft.models.loading import LoadedModel, load_classifier

__all__ = ["BertConfig", "BertForSequenceClassification", "BertModel", "LoadedModel", "load_classifier"]
