"""What a forker writes to prune BERT for sentence classification (docs/forking.md): a classifier on bert.py's
encoder in a few lines, then the method as it is: pruned with distillation, saved and loaded, compacted into a
smaller classifier that answers as its masked self."""
import torch
import torch.nn as nn

import blockprune as bp
import files
import report
from bert import Bert, BertConfig


class BertForSequenceClassification(nn.Module):
    """The encoder, its pooler and a linear layer over the classes, as transformers' model of that name."""

    def __init__(self, config, labels=3):
        super().__init__()
        self.config = config
        self.bert = Bert(config, pooler=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, labels)
        self.apply(self.bert.init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        x = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, hidden)
        return self.classifier(self.dropout(self.bert.pool(x)))  # (B, labels)


def test_a_sentence_classifier_is_pruned_distilled_and_compacted_to_its_masked_self(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    teacher = BertForSequenceClassification(config).eval()
    prune = bp.PruneConfig(block="16x16", target_density=0.4, warmup_steps=2, ramp_steps=20)
    masked = bp.MaskedBert(BertForSequenceClassification(config), prune).train()
    opt = torch.optim.AdamW(bp.param_groups(masked, lr=1e-3, scores_lr=1e-1))
    for step in range(30):
        ids = torch.randint(1, 100, (8, 16))
        labels = ids[:, 1] % 3
        masked.threshold, lam = bp.schedule(step, masked)
        with torch.no_grad():
            teacher_logits = teacher(ids)
        loss = bp.distillation_loss(masked(ids), teacher_logits, labels) + lam * bp.regularization(masked)
        loss.backward()
        opt.step()
        opt.zero_grad()
    bp.end_of_schedule(masked, 30)

    files.save_pretrained(masked, tmp_path)  # and back, rebuilt by the classifier's class
    masked = files.load_masked(tmp_path, BertForSequenceClassification).eval()
    small = bp.compact(masked).eval()
    ids = torch.randint(1, 100, (4, 16))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), masked(ids), atol=1e-5, rtol=0)
    assert type(small) is BertForSequenceClassification and small.bert.pooler is not None
    assert abs(report.structure(masked)["compact_density"] - 0.4) < 0.05  # the target, up to half a head
    assert sum(small.config.num_attention_heads) < 8
