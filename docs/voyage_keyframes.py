# (seed, prompt) keyframes in the lecture's format, for `ddpmkit voyage` with a digit text model.
seed_and_prompt_sequence = [
  3764, 'a handwritten zero',
  1537, 'the number 1, drawn thick',
  6573, 'a thin handwritten two',
  1791, 'the digit three',
  9973, 'a messy four',
  736, 'a neat handwritten number 5',
]
