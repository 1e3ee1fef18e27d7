"""
The dense teacher, fine-tuned as transformers' BertForQuestionAnswering instead of our bert.py: same
training loop, data, features, order, hyperparameters and evaluation (train_squad.py's), only the model
differs. Comparing its dev F1/EM with our teacher's checks that our BERT trains as well as the one
people use. transformers is the oracle here; the project itself never imports it.

    python tests/teacher_parity.py --preset minilm --output_dir runs/minilm/teacher-transformers
"""
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bookkeeping as bk  # noqa: E402
import train_squad as ts  # noqa: E402


class TransformersQA(torch.nn.Module):
    """transformers' model behind train_squad.py's interface: (ids, mask, types) -> (start, end)."""

    def __init__(self, path):
        super().__init__()
        self.hf = transformers.BertForQuestionAnswering.from_pretrained(path, attn_implementation="sdpa")

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.start_logits, out.end_logits

def main(argv=None):
    args = ts.parse_args(argv)
    torch.manual_seed(args.seed)
    path = Path(args.model_name_or_path)
    load_checkpoint, save_checkpoint = ts.load_checkpoint, ts.save_checkpoint
    ts.load_checkpoint = lambda name, dense=None: (TransformersQA(path), path / "vocab.txt", True)
    ts.save_checkpoint = lambda model, out, vocab, lowercase, records: (model.hf.save_pretrained(out),
                                                                         bk.write_unit(out, records))
    try:
        return ts.stage_finetune(args, str(path), Path(args.output_dir))
    finally:
        ts.load_checkpoint, ts.save_checkpoint = load_checkpoint, save_checkpoint


if __name__ == "__main__":
    print(main())
