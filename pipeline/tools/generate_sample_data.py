"""Generate the synthetic Chinese EMR disease-classification sample data.

Run from the repository root:

    python -m pipeline.tools.generate_sample_data          # (re)writes pipeline/sample_data/{train,dev,test}.jsonl
    python -m pipeline.tools.generate_sample_data --check  # same, then prints counts, lengths and two baselines
    python -m pipeline.tools.generate_sample_data --mode long   # writes pipeline/sample_data/long_{train,dev}.jsonl instead
    python -m pipeline.tools.generate_sample_data --mode multilabel  # multilabel_{train,dev,test}.jsonl
    python -m pipeline.tools.generate_sample_data --mode imbalanced  # imbalanced_{train,dev,test}.jsonl
    python -m pipeline.tools.generate_sample_data --mode realistic --check  # realistic_{train,dev,test}.jsonl
    python -m pipeline.tools.generate_sample_data --mode varied  # varied_{train,dev,test}.jsonl
    python -m pipeline.tools.generate_sample_data --mode long --unlabelled 2000 --out unlabelled.jsonl
        # 2,000 more notes of that set's kind, text only: "the unlabelled rest" for domain pretraining

Two small variants (a few hundred records a split, no label noise) for the multi-label and
class-weight features; the default files do not change with them:
- multilabel: co-morbid patients. A record mentions the findings of 1-3 diseases (50/35/15%),
  section by section (the first disease's vital signs only), and ``label`` is the JSON list of them.
- imbalanced: one disease per record as in the default set, but class shares from 24% down to 1.5%
  (IMBALANCED_SHARES), so the rarest classes have a dozen training records.

Each output line is ``{"text": "...", "label": "..."}`` (UTF-8, ``ensure_ascii=False``).
``text`` is an electronic-medical-record style note made of the sections
主诉 / 现病史 / 既往史 / 体格检查 / 辅助检查, in that order, some omitted in short
records.  ``label`` is one of the ten Chinese disease names in ``CLASSES``.
No 初步诊断 / 诊断 section is ever written, because it would leak the label.

Everything here is invented: no real patient data.  The findings (symptoms,
signs, history items, lab values, imaging results) are shared between classes
with class-specific probabilities and overlapping numeric ranges, and every
record also gets a few findings borrowed from other classes, so no single
keyword decides the label.

Long-record mode (``--mode long``): admission notes of about 600-1,200 characters, far past 512
tokens for a character-level model, with the boilerplate of real notes (history statement,
个人史 / 婚育史 / 家族史, a full normal general examination) between the opening and the tests.
In most of them (LATE_SHARE) the opening is vague (general malaise), so the decisive findings are
the 辅助检查 labs and imaging at the end, as in real notes; the rest open with the usual
informative 主诉 / 现病史.  Small splits (LONG_SPLITS) for tests and the long-record measurement.

Realistic mode (``--mode realistic``): the default notes with the character statistics of real
ones, for decisions that depend on them (the vocabulary): a long tail of rare characters (patients'
and relatives' names, places, input-method typos drawn by Zipf's law over the CJK block, so most are
seen once), Latin abbreviations beside the Chinese test names (WBC, CRP, cTnI, HbA1c, ECG ...), other
spellings of units (°C, mmhg, bpm), now and then traditional characters or half-width punctuation
(pasted text), and free-text sentences with dates, phone and record numbers and prescriptions, so
lengths run from one line to a page. ``--check`` prints how many characters training sees once.
Its own seed and files (realistic_{train,dev,test}.jsonl, 4,000/500/500, train noise as default).

Varied-length mode (``--mode varied``): notes whose lengths vary as real ones do, for measuring
length grouping. Each record's length is drawn from a lognormal (median about 45 characters, a long
tail to several hundred: VARIED_LENGTH); a note of its class is cut there at a clause end, or
followed by further notes of the same class until it is long enough. Capped at 128 tokens this
gives a mean near 60 tokens and random micro-batches of 16 that compute about 2x the real tokens,
as the held-out set of real notes measured in issue 24 (mean 62, 2.05x). Own seed.

Label noise: about 3% of *train* labels are replaced by a random other class
(deterministically).  dev and test are noise-free, so evaluation measures
accuracy against the generating class.

Determinism: one ``random.Random(seed)`` per split (plus one for the train
noise), all tables are lists or are only used for key lookup, so two runs give
byte-identical files, written atomically (base.write_text).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..core.base import write_text
from ..core.options import SAMPLE_DATA_DIR

SEED = 20240611
# (split name, number of records, apply label noise?)
SPLITS = [("train", 4000, True), ("dev", 500, False), ("test", 500, False)]
VARIANT_SPLITS = [("train", 800), ("dev", 300), ("test", 300)]  # the small multilabel/imbalanced sets
COMORBID_COUNTS = ([1, 2, 3], [50, 35, 15])  # diseases per multilabel record, and their weights
IMBALANCED_SHARES = dict(P=0.24, B=0.20, C=0.15, A=0.12, M=0.09, H=0.07, D=0.05, G=0.04, Y=0.025, S=0.015)
TRAIN_LABEL_NOISE = 0.03
# Long-record mode: its own seed, small splits (a dev size not divisible by 2 ranks).
LONG_SEED = 20261129
LONG_SPLITS = [("long_train", 600, True), ("long_dev", 301, False)]
VARIED_SEED = 20261205
VARIED_SPLITS = [("varied_train", 3000, True), ("varied_dev", 400, False), ("varied_test", 400, False)]
VARIED_LENGTH = (3.64, 1.1, 8)  # characters: 8 + lognormal(mu, sigma), i.e. median 46
LATE_SHARE = 0.7  # long notes whose opening says nothing specific: the exams at the end decide

# Short class keys keep the probability tables below readable.
# (key, label, sampling weight) -- weights make the balance roughly even, not exact.
CLASSES = [
    ("P", "社区获得性肺炎", 1.10),
    ("B", "急性支气管炎", 1.00),
    ("C", "慢性阻塞性肺疾病急性加重", 0.95),
    ("A", "支气管哮喘", 0.90),
    ("M", "急性心肌梗死", 1.05),
    ("H", "心力衰竭", 1.00),
    ("D", "2型糖尿病", 0.95),
    ("G", "急性胃肠炎", 1.10),
    ("Y", "急性胰腺炎", 0.95),
    ("S", "缺血性脑卒中", 1.00),
]
KEYS = [key for key, _, _ in CLASSES]
LABEL_OF = {key: label for key, label, _ in CLASSES}


# ---------------------------------------------------------------------------
# Findings tables.  Each entry: (short name or text, ..., {class key: probability}).
# A class not listed in the dict never produces the finding on its own, but it
# can still appear as a distractor borrowed from another class.
# ---------------------------------------------------------------------------

# (name used in 主诉, phrasing variants used in 现病史, per-class probability)
SYMPTOMS = [
    (
        "发热",
        ["发热，体温最高{temp}℃", "发热，伴畏寒、寒战", "低热，体温波动于37.5～38.0℃"],
        dict(P=0.80, B=0.40, C=0.25, A=0.08, M=0.04, H=0.08, D=0.04, G=0.40, Y=0.35, S=0.04),
    ),
    (
        "咳嗽",
        ["咳嗽，呈阵发性", "咳嗽，以夜间为甚", "刺激性干咳", "咳嗽"],
        dict(P=0.85, B=0.95, C=0.80, A=0.60, M=0.04, H=0.30, D=0.03, G=0.03, Y=0.03, S=0.04),
    ),
    (
        "咳痰",
        ["咳黄色脓痰", "咳白色黏痰，量中等", "咳少量白痰，不易咳出", "咳铁锈色痰"],
        dict(P=0.70, B=0.60, C=0.80, A=0.25, H=0.15),
    ),
    (
        "气促",
        ["活动后气促", "气促，稍活动即加重", "气促，爬一层楼即需休息"],
        dict(P=0.35, B=0.06, C=0.80, A=0.40, M=0.10, H=0.75, D=0.03, Y=0.05),
    ),
    ("呼吸困难", ["呼吸困难", "夜间阵发性呼吸困难", "呼吸困难，不能平卧"], dict(P=0.15, C=0.40, A=0.50, M=0.15, H=0.60, Y=0.06)),
    ("喘息", ["喘息，呼气时明显", "喘息，伴喉中哮鸣音", "喘息"], dict(B=0.10, C=0.50, A=0.85, H=0.12)),
    ("胸闷", ["胸闷", "胸闷，休息后可稍缓解", "胸闷、憋气"], dict(B=0.15, C=0.40, A=0.60, M=0.55, H=0.45, Y=0.05, S=0.03)),
    (
        "胸痛",
        ["胸骨后压榨样疼痛，向左肩部放射", "胸痛，咳嗽及深呼吸时加重", "心前区闷痛，持续约{minutes}分钟", "胸痛"],
        dict(P=0.20, B=0.08, M=0.80, H=0.08, Y=0.04),
    ),
    ("心悸", ["心悸", "阵发性心悸"], dict(C=0.10, A=0.10, M=0.25, H=0.40, D=0.04, S=0.04)),
    ("乏力", ["乏力", "全身乏力，活动耐力下降"], dict(P=0.40, B=0.30, C=0.30, M=0.20, H=0.50, D=0.55, G=0.30, Y=0.10, S=0.10)),
    ("大汗", ["大汗淋漓", "出冷汗"], dict(M=0.50, Y=0.08, H=0.05)),
    ("双下肢水肿", ["双下肢水肿，以午后为甚", "双下肢凹陷性水肿"], dict(C=0.15, H=0.60, D=0.05)),
    ("多饮多尿", ["口干、多饮、多尿", "多饮、多尿，每日饮水约{liters}L"], dict(D=0.75, S=0.03)),
    ("体重下降", ["体重下降约{kg}kg", "消瘦"], dict(D=0.50, C=0.08, P=0.03)),
    ("视物模糊", ["视物模糊"], dict(D=0.25, S=0.10)),
    ("肢体麻木", ["双足麻木", "肢体麻木", "{side}侧肢体麻木"], dict(D=0.30, S=0.40)),
    ("恶心", ["恶心"], dict(P=0.08, M=0.25, D=0.12, G=0.55, Y=0.60, S=0.10)),
    ("呕吐", ["呕吐胃内容物{times}次", "呕吐，呈非喷射性"], dict(M=0.10, D=0.06, G=0.55, Y=0.60, S=0.08)),
    ("腹痛", ["上腹部持续性胀痛，向腰背部放射", "脐周阵发性绞痛", "腹痛", "上腹部疼痛"], dict(M=0.08, D=0.06, G=0.65, Y=0.95)),
    ("腹泻", ["腹泻，为黄色稀水样便，每日{times}次", "解稀便{times}次"], dict(G=0.85, Y=0.08)),
    ("腹胀", ["腹胀"], dict(H=0.20, G=0.20, Y=0.50)),
    ("食欲下降", ["食欲下降", "纳差"], dict(P=0.25, B=0.10, H=0.20, D=0.10, G=0.30, Y=0.20)),
    ("头晕", ["头晕", "头晕，伴视物旋转"], dict(M=0.15, D=0.15, G=0.10, S=0.40)),
    ("头痛", ["头痛", "头部胀痛"], dict(P=0.10, B=0.15, S=0.20)),
    ("肢体无力", ["{side}侧肢体无力", "{side}侧肢体活动不利，持物不稳"], dict(S=0.80, D=0.03)),
    ("言语不清", ["言语含糊", "言语不清"], dict(S=0.55)),
    ("口角歪斜", ["口角歪斜"], dict(S=0.40)),
    ("意识障碍", ["意识模糊", "嗜睡"], dict(P=0.05, C=0.05, D=0.04, S=0.15)),
]
SYMPTOM_NAMES = [name for name, _, _ in SYMPTOMS]

# (duration unit, min, max) choices per class for the current episode.
DURATIONS = dict(
    P=[("天", 2, 10)],
    B=[("天", 2, 14), ("周", 1, 3)],
    C=[("天", 2, 10)],
    A=[("小时", 3, 23), ("天", 1, 5)],
    M=[("小时", 1, 12), ("天", 1, 2)],
    H=[("天", 3, 14), ("周", 1, 4)],
    D=[("周", 2, 8), ("个月", 1, 6)],
    G=[("小时", 6, 23), ("天", 1, 3)],
    Y=[("小时", 4, 23), ("天", 1, 3)],
    S=[("小时", 2, 23), ("天", 1, 3)],
)
# Chance that the episode is described as an exacerbation of a chronic problem.
CHRONIC = dict(B=0.05, C=0.90, A=0.60, H=0.55, D=0.20, S=0.05, G=0.03, Y=0.10, M=0.10, P=0.05)

TRIGGERS = [
    ("受凉后", dict(P=0.35, B=0.45, C=0.35, A=0.20, H=0.15)),
    ("劳累后", dict(P=0.10, B=0.05, C=0.05, M=0.15, H=0.30, S=0.05)),
    ("活动后", dict(M=0.20, H=0.20, A=0.10, S=0.05)),
    ("接触刺激性气体后", dict(A=0.30, B=0.08, C=0.05)),
    ("进食不洁食物后", dict(G=0.55, Y=0.05)),
    ("饱餐、饮酒后", dict(Y=0.55, G=0.15, M=0.08)),
    ("情绪激动后", dict(M=0.15, S=0.15, H=0.05)),
    ("晨起时", dict(S=0.30, M=0.10, A=0.05)),
]

# (history text, per-class probability)
HISTORY = [
    (
        "高血压病史{years}年，最高血压{sbp}/{dbp}mmHg，规律服用{antihypertensive}",
        dict(P=0.20, B=0.12, C=0.25, A=0.10, M=0.55, H=0.60, D=0.40, G=0.10, Y=0.20, S=0.65),
    ),
    ("2型糖尿病病史{years}年，口服二甲双胍治疗", dict(P=0.10, C=0.08, M=0.30, H=0.30, D=0.30, Y=0.08, S=0.35, G=0.04)),
    ("发现血糖升高{years}年，未规律治疗", dict(D=0.45, S=0.08, M=0.05)),
    ("冠心病病史{years}年", dict(C=0.08, M=0.30, H=0.45, D=0.10, S=0.15, P=0.05)),
    ("慢性阻塞性肺疾病病史{years}年", dict(C=0.60, H=0.10, P=0.08)),
    ("支气管哮喘病史{years}年", dict(A=0.55, C=0.08, B=0.05)),
    ("过敏性鼻炎病史", dict(A=0.30, B=0.08)),
    ("胆囊结石病史{years}年", dict(Y=0.45, G=0.08, D=0.05)),
    ("高脂血症病史", dict(M=0.30, S=0.30, Y=0.25, D=0.25, H=0.15)),
    ("心房颤动病史{years}年", dict(H=0.30, S=0.25)),
    ("脑梗死病史{years}年，遗留轻度肢体无力", dict(S=0.20, H=0.05, D=0.04)),
    ("慢性胃炎病史", dict(G=0.20, Y=0.10)),
    ("吸烟史{years}年，每日约{cigs}支", dict(P=0.30, B=0.30, C=0.75, A=0.10, M=0.50, H=0.25, D=0.15, G=0.10, Y=0.20, S=0.35)),
    ("饮酒史{years}年，每日饮白酒约{liquor}两", dict(Y=0.50, M=0.15, S=0.15, G=0.10, D=0.10, H=0.10)),
]
ALLERGY = ["否认药物过敏史", "否认药物过敏史", "否认食物、药物过敏史", "青霉素过敏史", "磺胺类药物过敏史"]

# (exam sign text, per-class probability)
SIGNS = [
    ("急性病容", dict(P=0.30, A=0.30, M=0.40, G=0.20, Y=0.50, S=0.10, C=0.20, H=0.20)),
    ("口唇发绀", dict(P=0.15, C=0.40, A=0.30, H=0.30)),
    ("桶状胸", dict(C=0.55, A=0.08)),
    ("双肺呼吸音粗", dict(P=0.30, B=0.60, C=0.30, A=0.20, H=0.10)),
    ("{side}下肺可闻及湿啰音", dict(P=0.60, B=0.10, C=0.15)),
    ("双肺可闻及散在干湿啰音", dict(P=0.20, B=0.30, C=0.40)),
    ("双肺底可闻及湿啰音", dict(P=0.10, C=0.10, M=0.15, H=0.60)),
    ("双肺可闻及哮鸣音", dict(B=0.12, C=0.45, A=0.80, H=0.10)),
    ("呼气相延长", dict(C=0.40, A=0.50)),
    ("颈静脉怒张", dict(C=0.10, H=0.45)),
    ("心界向左下扩大", dict(M=0.05, H=0.40)),
    ("心律绝对不齐", dict(H=0.20, S=0.20)),
    ("心音低钝", dict(M=0.35, H=0.20)),
    ("双下肢凹陷性水肿", dict(C=0.15, H=0.60, D=0.05)),
    ("上腹部压痛", dict(M=0.05, G=0.35, Y=0.80)),
    ("腹肌紧张，反跳痛阳性", dict(Y=0.35, G=0.05)),
    ("肠鸣音活跃", dict(G=0.60)),
    ("肠鸣音减弱", dict(Y=0.40, G=0.05)),
    ("皮肤弹性差", dict(G=0.30, D=0.20)),
    ("{side}侧肢体肌力{muscle}级", dict(S=0.75)),
    ("{side}侧巴氏征阳性", dict(S=0.50)),
    ("伸舌偏{side}", dict(S=0.30)),
    ("双足背动脉搏动减弱", dict(D=0.20, S=0.05)),
    ("双足针刺觉减退", dict(D=0.25)),
]

# Imaging / ECG / other study results, (text, per-class probability).
STUDIES = [
    ("胸部CT示{side}下肺斑片状渗出影", dict(P=0.60, C=0.10)),
    ("胸部CT示双肺纹理增粗", dict(P=0.10, B=0.45, C=0.30, A=0.15)),
    ("胸部CT示双肺透亮度增高，肺气肿改变", dict(C=0.50, A=0.10)),
    ("胸部X线示心影增大，双侧少量胸腔积液", dict(H=0.45)),
    ("胸部CT未见明显异常", dict(B=0.30, A=0.35, M=0.10, D=0.05, G=0.03)),
    ("心电图示窦性心动过速", dict(P=0.20, A=0.15, M=0.10, H=0.20, G=0.10, Y=0.15)),
    ("心电图示V1～V4导联ST段抬高", dict(M=0.45)),
    ("心电图示Ⅱ、Ⅲ、aVF导联ST段弓背向上抬高", dict(M=0.30)),
    ("心电图示ST-T改变", dict(M=0.20, H=0.30, D=0.10, S=0.15)),
    ("心电图示心房颤动", dict(H=0.25, S=0.20)),
    ("心电图大致正常", dict(B=0.10, D=0.20, G=0.10, Y=0.05)),
    ("心脏彩超示左室射血分数{ef}%", dict(H=0.60, M=0.30)),
    ("心脏彩超示节段性室壁运动异常", dict(M=0.35, H=0.05)),
    ("肺功能示FEV1/FVC {fev}%，支气管舒张试验阳性", dict(A=0.45)),
    ("肺功能示FEV1/FVC {fev}%，支气管舒张试验阴性", dict(C=0.40)),
    ("腹部CT示胰腺肿大，胰周渗出", dict(Y=0.55)),
    ("腹部超声示胆囊结石", dict(Y=0.30, G=0.05)),
    ("腹部超声未见明显异常", dict(G=0.35, D=0.10, M=0.05)),
    ("腹部立位平片示肠管积气", dict(G=0.15, Y=0.15)),
    ("头颅MRI示{lesion_side}侧基底节区急性脑梗死", dict(S=0.55)),
    ("头颅CT未见出血", dict(S=0.50)),
    ("头颅CT示腔隙性脑梗死", dict(S=0.20, D=0.08, H=0.05, M=0.05)),
    ("尿常规示尿糖(+++)，尿酮体(+)", dict(D=0.45)),
    ("便常规示白细胞(+)", dict(G=0.40)),
    ("颈部血管超声示颈动脉斑块形成", dict(S=0.40, D=0.10, M=0.10)),
]


@dataclass(frozen=True)
class Lab:
    name: str
    unit: str
    decimals: int
    normal: tuple[float, float]
    abnormal: dict  # class key -> (low, high); ranges deliberately overlap


@dataclass(frozen=True)
class Panel:
    title: str  # "" for a single test reported on its own
    labs: list
    prob: dict  # class key -> chance the panel is reported; "*" = default


PANELS = [
    Panel(
        "血常规",
        [
            Lab(
                "白细胞计数",
                "×10^9/L",
                1,
                (4.0, 9.5),
                dict(P=(9, 18), B=(5, 12), C=(6, 14), A=(5, 11), M=(7, 14), G=(7, 15), Y=(9, 19)),
            ),
            Lab(
                "中性粒细胞百分比", "%", 1, (50, 72), dict(P=(75, 92), B=(60, 80), C=(65, 85), M=(65, 82), G=(70, 88), Y=(75, 92))
            ),
            Lab("血红蛋白", "g/L", 0, (115, 160), dict(H=(95, 140), G=(130, 170))),
        ],
        dict(P=0.95, B=0.85, C=0.85, A=0.75, G=0.90, Y=0.90, **{"*": 0.70}),
    ),
    Panel(
        "",
        [
            Lab(
                "C反应蛋白",
                "mg/L",
                1,
                (0.5, 8),
                dict(P=(30, 180), B=(5, 40), C=(10, 60), M=(5, 30), H=(3, 20), G=(10, 60), Y=(40, 200)),
            ),
        ],
        dict(P=0.75, B=0.60, C=0.60, G=0.55, Y=0.65, **{"*": 0.35}),
    ),
    Panel(
        "",
        [
            Lab("降钙素原", "ng/mL", 2, (0.02, 0.08), dict(P=(0.1, 2.5), Y=(0.1, 1.5), G=(0.05, 0.5), C=(0.05, 0.3))),
        ],
        dict(P=0.45, Y=0.35, **{"*": 0.12}),
    ),
    Panel(
        "心肌损伤标志物",
        [
            Lab("肌钙蛋白I", "ng/mL", 3, (0.001, 0.03), dict(M=(0.5, 25), H=(0.02, 0.15), C=(0.01, 0.05), S=(0.005, 0.06))),
            Lab("CK-MB", "U/L", 1, (8, 22), dict(M=(40, 250), H=(12, 30))),
        ],
        dict(M=0.90, H=0.55, **{"*": 0.20}),
    ),
    Panel(
        "",
        [
            Lab("NT-proBNP", "pg/mL", 0, (30, 300), dict(H=(1800, 15000), M=(300, 3000), C=(100, 900), A=(50, 400))),
        ],
        dict(H=0.85, M=0.45, C=0.35, **{"*": 0.10}),
    ),
    Panel(
        "",
        [
            Lab("随机血糖", "mmol/L", 1, (4.4, 7.8), dict(D=(11, 28), M=(6, 12), S=(5.5, 11), Y=(6, 12), H=(5, 9))),
        ],
        dict(D=0.95, S=0.50, M=0.40, Y=0.40, **{"*": 0.30}),
    ),
    Panel(
        "",
        [
            Lab("糖化血红蛋白", "%", 1, (4.8, 6.0), dict(D=(7.5, 13), S=(5.5, 8), M=(5.5, 8))),
        ],
        dict(D=0.70, S=0.25, M=0.15, **{"*": 0.05}),
    ),
    Panel(
        "",
        [
            Lab("血淀粉酶", "U/L", 0, (40, 110), dict(Y=(400, 2500), G=(50, 180))),
            Lab("脂肪酶", "U/L", 0, (10, 60), dict(Y=(300, 3000), G=(20, 90))),
        ],
        dict(Y=0.90, G=0.30, M=0.05, **{"*": 0.05}),
    ),
    Panel(
        "电解质",
        [
            Lab("血钾", "mmol/L", 2, (3.5, 5.0), dict(G=(2.9, 4.0), H=(3.3, 5.4), D=(3.4, 5.3), Y=(3.2, 4.6))),
            Lab("血钠", "mmol/L", 0, (136, 145), dict(G=(130, 140), H=(128, 140))),
        ],
        dict(G=0.60, H=0.50, D=0.40, **{"*": 0.25}),
    ),
    Panel(
        "肾功能",
        [
            Lab("肌酐", "μmol/L", 0, (50, 100), dict(H=(80, 180), D=(60, 130), G=(60, 140))),
            Lab("尿素氮", "mmol/L", 1, (3.0, 7.5), dict(H=(6, 15), G=(5, 10))),
        ],
        dict(H=0.50, D=0.40, G=0.30, **{"*": 0.25}),
    ),
    Panel(
        "血气分析",
        [
            Lab("pH", "", 2, (7.36, 7.44), dict(C=(7.25, 7.38), A=(7.38, 7.48), D=(7.20, 7.38))),
            Lab("PaO2", "mmHg", 0, (80, 98), dict(P=(55, 80), C=(45, 65), A=(55, 80), H=(55, 80))),
            Lab("PaCO2", "mmHg", 0, (35, 45), dict(C=(48, 75), A=(30, 45))),
        ],
        dict(C=0.70, A=0.45, P=0.30, H=0.25, **{"*": 0.05}),
    ),
    Panel(
        "血脂",
        [
            Lab("总胆固醇", "mmol/L", 2, (3.0, 5.2), dict(M=(4.5, 7.0), S=(4.5, 7.0), D=(4.5, 6.8))),
            Lab("甘油三酯", "mmol/L", 2, (0.6, 1.7), dict(Y=(2.0, 15.0), D=(1.5, 4.0), M=(1.2, 3.0))),
        ],
        dict(M=0.30, S=0.35, D=0.30, Y=0.25, **{"*": 0.08}),
    ),
    Panel(
        "",
        [
            Lab("D-二聚体", "mg/L", 2, (0.05, 0.5), dict(P=(0.3, 1.5), M=(0.3, 1.2), H=(0.3, 1.5), S=(0.3, 1.2))),
        ],
        dict(P=0.20, M=0.25, H=0.25, S=0.20, **{"*": 0.08}),
    ),
]

# Vital signs: class -> (low, high); the default applies to unlisted classes.
PULSE = dict(P=(88, 120), C=(90, 118), A=(95, 125), M=(58, 115), H=(90, 125), G=(80, 110), Y=(90, 120), **{"*": (64, 98)})
RESP = dict(P=(20, 28), C=(22, 30), A=(22, 30), H=(22, 30), **{"*": (16, 20)})
SYSTOLIC = dict(S=(150, 195), M=(90, 165), H=(105, 170), D=(120, 150), G=(95, 125), **{"*": (105, 140)})
SPO2 = dict(P=(88, 96), C=(82, 92), A=(88, 96), H=(86, 95), **{"*": (95, 99)})
AGES = dict(
    P=(18, 88), B=(16, 75), C=(55, 88), A=(14, 70), M=(40, 85), H=(50, 90), D=(28, 78), G=(16, 70), Y=(25, 75), S=(45, 88)
)

DRUGS = ["阿莫西林", "头孢类抗生素", "止咳化痰药物", "布洛芬", "硝酸甘油", "雾化吸入", "蒙脱石散", "奥美拉唑", "静脉输液", "中药"]
EFFECTS = ["症状无明显缓解", "症状稍缓解后再发", "效果欠佳", "症状持续加重"]
ANTIHYPERTENSIVES = ["氨氯地平", "缬沙坦", "硝苯地平控释片", "厄贝沙坦"]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def fill(text: str, rng: random.Random, ctx: dict) -> str:
    """Replace {placeholders} with random but plausible values.

    ``ctx`` carries per-record values (e.g. the affected body side) so that the
    same record stays internally consistent.
    """
    # A list, not a dict comprehension over the text, so the rng call order is fixed.
    fillers = [
        ("{temp}", lambda: f"{rng.uniform(38.0, 40.2):.1f}"),
        ("{minutes}", lambda: str(rng.randint(15, 90))),
        ("{liters}", lambda: str(rng.randint(2, 5))),
        ("{kg}", lambda: str(rng.randint(2, 10))),
        ("{times}", lambda: str(rng.randint(3, 10))),
        ("{years}", lambda: str(rng.randint(1, 25))),
        ("{cigs}", lambda: str(rng.choice([5, 10, 20, 30, 40]))),
        ("{liquor}", lambda: str(rng.randint(2, 8))),
        ("{sbp}", lambda: str(rng.randint(150, 200))),
        ("{dbp}", lambda: str(rng.randint(90, 115))),
        ("{antihypertensive}", lambda: rng.choice(ANTIHYPERTENSIVES)),
        ("{muscle}", lambda: str(rng.randint(2, 4))),
        ("{ef}", lambda: str(rng.randint(28, 52))),
        ("{fev}", lambda: str(rng.randint(42, 69))),
        ("{side}", lambda: ctx["side"]),
        ("{lesion_side}", lambda: ctx["lesion_side"]),
    ]
    for token, make in fillers:
        while token in text:
            text = text.replace(token, make(), 1)
    return text


def class_prob(table: dict, key: str) -> float:
    return table.get(key, table.get("*", 0.0))


def pick_findings(rng: random.Random, key: str, table: list, n_distractors: int) -> list:
    """Indices of table rows chosen for this record.

    Each row is kept with its class-specific probability; then a few rows that
    this class would rarely produce are added as distractors.
    """
    chosen = [i for i, row in enumerate(table) if rng.random() < class_prob(row[-1], key)]
    others = [i for i in range(len(table)) if i not in chosen]
    for i in rng.sample(others, min(n_distractors, len(others))):
        chosen.append(i)
    return chosen


def rand_range(rng: random.Random, lo_hi: tuple, decimals: int = 0) -> str:
    value = rng.uniform(*lo_hi)
    return f"{value:.{decimals}f}" if decimals else str(round(value))


# ---------------------------------------------------------------------------
# Record assembly
# ---------------------------------------------------------------------------


def make_record(rng: random.Random, key: str) -> str:
    return "".join(f"{title}：{body}。" for title, body in record_sections(rng, key))


def record_sections(rng: random.Random, key: str, style: str = "") -> list:
    """(title, body) sections of one note; `style` short|normal|long, else drawn."""
    style = style or rng.choices(["short", "normal", "long"], weights=[15, 67, 18])[0]
    side = rng.choice(["左", "右"])
    # Motor symptoms are on the side opposite to the brain lesion.
    ctx = {"side": side, "lesion_side": "右" if side == "左" else "左"}
    age = rng.randint(*AGES[key])
    sex = rng.choice(["男", "女"])

    # --- symptoms: class pool + distractors; the strongest ones go first.
    sym_idx = pick_findings(rng, key, SYMPTOMS, rng.choice([0, 1, 1, 2]))
    own = [i for i in sym_idx if class_prob(SYMPTOMS[i][2], key) > 0]
    own.sort(key=lambda i: -class_prob(SYMPTOMS[i][2], key))
    extra = [i for i in sym_idx if i not in own]
    if not own:  # every patient presents with something typical of the class
        pool = SYMPTOMS
        weights = [class_prob(row[2], key) for row in pool]
        own = [rng.choices(range(len(pool)), weights=weights)[0]]
    ordered = own + extra
    names = [SYMPTOMS[i][0] for i in ordered]
    details = [fill(rng.choice(SYMPTOMS[i][1]), rng, ctx) for i in ordered]

    unit, lo, hi = rng.choice(DURATIONS[key])
    duration = f"{rng.randint(lo, hi)}{unit}"
    chronic = rng.random() < CHRONIC[key]
    chronic_years = rng.randint(2, 20)

    # --- 主诉: 1-3 leading symptoms plus duration.
    n_cc = min(len(names), rng.randint(1, 3))
    cc_names = names[:n_cc]
    if chronic and n_cc > 1:
        complaint = f"反复{cc_names[0]}{chronic_years}年，加重伴{'、'.join(cc_names[1:])}{duration}"
    elif chronic:
        complaint = f"反复{cc_names[0]}{chronic_years}年，加重{duration}"
    elif n_cc > 1 and rng.random() < 0.4:
        complaint = f"{'、'.join(cc_names[:-1])}伴{cc_names[-1]}{duration}"
    else:
        complaint = f"{'、'.join(cc_names)}{duration}"

    # --- 现病史
    trig_weights = [class_prob(t[1], key) for t in TRIGGERS]
    if rng.random() < 0.5 and sum(trig_weights) > 0:
        trigger = rng.choices([t[0] for t in TRIGGERS], weights=trig_weights)[0]
    else:
        trigger = "无明显诱因"
    patient = f"患者，{sex}，{age}岁，" if rng.random() < 0.5 else "患者"
    parts = []
    if chronic:
        parts.append(
            f"{patient}{chronic_years}年前起反复出现{details[0]}，"
            f"{rng.choice(['每年发作数次', '冬春季节多发', '经治疗后可缓解'])}，"
            f"{duration}前{trigger}上述症状加重"
        )
        rest = details[1:]
    else:
        parts.append(f"{patient}{duration}前{trigger}出现{details[0]}")
        rest = details[1:]
    if rest:
        parts.append("伴" + "，".join(rest))
    negatives = [n for n in SYMPTOM_NAMES if n not in names]
    n_neg = {"short": rng.randint(1, 2), "normal": rng.randint(1, 3), "long": rng.randint(2, 4)}[style]
    negated = rng.sample(negatives, n_neg)
    parts.append("无" + "、".join(negated))
    if style != "short" and rng.random() < 0.5:
        parts.append(f"曾{rng.choice(['自服', '于当地诊所予', '于社区医院予'])}{rng.choice(DRUGS)}治疗，{rng.choice(EFFECTS)}")
    if style == "long":
        parts.extend(long_narrative(rng, key, ctx, names, negated))
    if style == "long" or (style == "normal" and rng.random() < 0.6):
        weight = "减轻" if "体重下降" in names else "无明显变化"  # agree with the symptoms above
        parts.append(
            f"病程中精神{rng.choice(['可', '欠佳', '差'])}，饮食{rng.choice(['可', '差', '减少'])}，"
            f"睡眠{rng.choice(['可', '欠佳'])}，大小便{rng.choice(['正常', '无明显异常'])}，体重{weight}"
        )
    present_illness = "，".join(parts)

    sections = [("主诉", complaint), ("现病史", present_illness)]

    # --- 既往史 (skipped in short records: they read like a brief triage note)
    if style != "short" and rng.random() < 0.85:
        hist = [fill(HISTORY[i][0], rng, ctx) for i in pick_findings(rng, key, HISTORY, rng.choice([0, 0, 1]))]
        hist = hist or ["既往体健"]
        hist.append(rng.choice(ALLERGY))
        sections.append(("既往史", "；".join(hist)))

    # --- 体格检查
    if style != "short" or rng.random() < 0.6:
        sections.append(("体格检查", physical_exam(rng, key, ctx, "发热" in names, "意识障碍" in names, style)))

    # --- 辅助检查
    if style == "long" or (style == "normal" and rng.random() < 0.85) or (style == "short" and rng.random() < 0.3):
        aux = aux_exams(rng, key, ctx, style)
        if aux:
            sections.append(("辅助检查", aux))
    return sections


# Items of a second disease's 体格检查 that the first disease's already states (vital signs, consciousness).
VITALS = re.compile(r"(T|P|R|BP|SpO2) |神志清楚|嗜睡")


def make_comorbid_record(rng: random.Random, keys: list) -> str:
    """One note for a patient with every disease in `keys`: each section joins the diseases' findings
    (repeated items once); the vital signs are the first disease's."""
    merged = {}
    for n, key in enumerate(keys):
        for title, body in record_sections(rng, key):
            items = [item for part in body.split("；") for item in ([part] if title != "体格检查" else part.split("，"))]
            if title == "体格检查" and n:
                items = [item for item in items if not VITALS.match(item)]
            merged.setdefault(title, []).extend(items)
    order = ["主诉", "现病史", "既往史", "体格检查", "辅助检查"]
    sections = [(title, list(dict.fromkeys(merged[title]))) for title in order if merged.get(title)]
    return "".join(f"{title}：{('，' if title == '体格检查' else '；').join(items)}。" for title, items in sections)


def long_narrative(rng: random.Random, key: str, ctx: dict, present: list, negated: list) -> list:
    """Extra course-of-illness sentences that push long records past 512 chars.

    ``present`` / ``negated`` are the symptom names already stated, so the
    narrative never contradicts an earlier "无…".
    """
    out = []
    more = [i for i, row in enumerate(SYMPTOMS) if class_prob(row[2], key) > 0 and row[0] not in negated]
    steps = rng.sample(["此后症状进一步加重", "其间症状反复", "近期夜间症状明显", "活动后症状加重"], rng.randint(2, 4))
    for step, i in zip(steps, rng.sample(more, min(len(steps), len(more)))):
        present = present + [SYMPTOMS[i][0]]
        out.append(f"{step}，{fill(rng.choice(SYMPTOMS[i][1]), rng, ctx)}")
    visits = ["入院前曾于外院就诊", "今日于我院急诊就诊"][: rng.randint(1, 2)]
    for visit in visits:
        panel = rng.choice(PANELS)
        drugs = rng.sample(DRUGS, 2)
        out.append(f"{visit}，查{panel_text(rng, key, panel)}，予{drugs[0]}、{drugs[1]}等治疗，{rng.choice(EFFECTS)}")
    out.append(f"为求进一步诊治，门诊以“{present[0]}待查”收入我科")
    absent = [n for n in SYMPTOM_NAMES if n not in present and n not in negated]
    out.append("发病以来无" + "、".join(rng.sample(absent, rng.randint(2, 5))) + "等不适")
    return out


def physical_exam(rng: random.Random, key: str, ctx: dict, fever: bool, drowsy: bool, style: str) -> str:
    temp = rng.uniform(37.6, 39.8) if fever else rng.uniform(36.2, 37.3)
    sbp = rng.randint(*class_prob(SYSTOLIC, key))
    dbp = max(50, round(sbp * rng.uniform(0.55, 0.68)))
    items = [
        f"T {temp:.1f}℃，P {rng.randint(*class_prob(PULSE, key))}次/分，"
        f"R {rng.randint(*class_prob(RESP, key))}次/分，BP {sbp}/{dbp}mmHg"
    ]
    if rng.random() < 0.4:
        items.append(f"SpO2 {rng.randint(*class_prob(SPO2, key))}%")
    items.append("嗜睡" if drowsy else "神志清楚")
    signs = pick_findings(rng, key, SIGNS, rng.choice([0, 1, 1, 2]))
    if style == "short":
        signs = signs[:1]
    items.extend(fill(SIGNS[i][0], rng, ctx) for i in signs)
    return "，".join(items)


def panel_text(rng: random.Random, key: str, panel: Panel) -> str:
    values = []
    for lab in panel.labs:
        # ~15% of patients in an "abnormal" class still have a normal value (mild cases).
        lo_hi = lab.abnormal.get(key, lab.normal)
        if rng.random() < 0.15:
            lo_hi = lab.normal
        # "PaO2 66mmHg" rather than "PaO266mmHg": separate Latin names from the number.
        sep = " " if lab.name[-1].isascii() else ""
        values.append(f"{lab.name}{sep}{rand_range(rng, lo_hi, lab.decimals)}{lab.unit}")
    body = "，".join(values)
    return f"{panel.title}：{body}" if panel.title else body


def aux_exams(rng: random.Random, key: str, ctx: dict, style: str) -> str:
    # Long records report more tests; short ones at most one.
    boost = {"short": -0.3, "normal": 0.0, "long": 0.35}[style]
    items = [panel_text(rng, key, p) for p in PANELS if rng.random() < class_prob(p.prob, key) + boost]
    studies = pick_findings(rng, key, STUDIES, rng.choice([0, 1, 1, 2]))
    items.extend(fill(STUDIES[i][0], rng, ctx) for i in studies)
    if style == "short":
        items = items[:1]
    return "；".join(items)


# ---------------------------------------------------------------------------
# Long records: the same findings, wrapped in the boilerplate of real admission notes
# ---------------------------------------------------------------------------

# Shared by every class: they carry no information about the label.
VAGUE_COMPLAINTS = ["全身不适", "身体不适", "自觉不适", "精神状态差", "周身酸痛不适"]
VAGUE_COURSE = [
    "症状时轻时重，与体位、活动及进食无明显关系",
    "家属诉患者近期情绪低落，夜间睡眠较差",
    "曾于社区卫生服务中心就诊，具体诊治经过不详",
    "自行休息后未见明显好转",
    "家属代诉病史，部分细节描述欠清",
    "病程中无明显规律，亦无特殊加重或缓解因素",
    "自觉上述不适影响日常生活",
]
STATEMENTS = ["病史陈述者：患者本人，可靠", "病史陈述者：患者家属，基本可靠", "病史陈述者：患者本人及家属，可靠"]
PERSONAL = [
    "生于原籍，久居本地，无疫区、疫水接触史",
    "无工业毒物、粉尘及放射性物质接触史",
    "无冶游史",
    "退休，平素生活规律",
    "务农，平素体力劳动为主",
    "否认吸毒史",
]
MARITAL = ["适龄结婚，配偶体健，育有1子", "适龄结婚，配偶体健，育有1子1女", "已婚，育有2女，子女均体健", "丧偶，育有1女"]
FAMILY = ["父母已故，死因不详", "父母健在", "否认家族遗传病史", "否认家族中类似疾病史", "兄弟姐妹体健"]
GENERAL_EXAM = [
    "发育正常，营养中等，自主体位，查体合作",
    "全身皮肤黏膜无黄染，无皮疹及出血点",
    "全身浅表淋巴结未触及肿大",
    "头颅无畸形，眼睑无水肿，巩膜无黄染，双侧瞳孔等大等圆，对光反射灵敏",
    "耳鼻无异常分泌物，伸舌居中，咽部无充血，扁桃体无肿大",
    "颈软，无抵抗，颈静脉无怒张，气管居中，甲状腺未触及肿大",
    "脊柱、四肢无畸形，关节无红肿",
    "肛门及外生殖器未查",
]


def long_record(rng: random.Random, key: str) -> str:
    """One long admission note; in LATE_SHARE of them only the tests at the end are specific."""
    ctx = {"side": rng.choice(["左", "右"])}
    ctx["lesion_side"] = "右" if ctx["side"] == "左" else "左"
    found = dict(record_sections(rng, key, style="long"))
    aux = aux_exams(rng, key, ctx, "long")
    while not aux:  # the tests are the point of these notes
        aux = aux_exams(rng, key, ctx, "long")
    sections = [("入院记录", rng.choice(STATEMENTS))]
    if rng.random() < LATE_SHARE:
        complaint, days = rng.choice(VAGUE_COMPLAINTS), f"{rng.randint(2, 30)}天"
        course = rng.sample(VAGUE_COURSE, rng.randint(3, 5))
        sections += [("主诉", f"{complaint}{days}"), ("现病史", f"患者{days}前无明显诱因出现{complaint}，" + "，".join(course))]
    else:
        sections += [("主诉", found["主诉"]), ("现病史", found["现病史"])]
    sections += [
        ("既往史", found.get("既往史", "既往体健；" + rng.choice(ALLERGY))),
        ("个人史", "，".join(rng.sample(PERSONAL, rng.randint(3, 5)))),
        ("婚育史", rng.choice(MARITAL)),
        ("家族史", "，".join(rng.sample(FAMILY, 2))),
        ("体格检查", "，".join([found.get("体格检查", "神志清楚"), *GENERAL_EXAM])),
        ("辅助检查", aux),
    ]
    return "".join(f"{title}：{body}。" for title, body in sections)


# ---------------------------------------------------------------------------
# Realistic mode: character statistics of real notes on top of the default findings
# ---------------------------------------------------------------------------

# Its own seed and files; the default records' findings (and so their labels' evidence) underneath.
REALISTIC_SEED = 20261205
REALISTIC_SPLITS = [("realistic_train", 4000, True), ("realistic_dev", 500, False), ("realistic_test", 500, False)]
# Rare characters (names, places, typos) are drawn by Zipf's law over the CJK block in a fixed
# shuffled order: a few hundred recur, thousands are seen once, as in real text.
CJK_POOL = [chr(c) for c in range(0x4E00, 0x9FA6)]
random.Random(REALISTIC_SEED).shuffle(CJK_POOL)
ZIPF_CUMULATIVE = list(itertools.accumulate(1.0 / rank**1.3 for rank in range(1, len(CJK_POOL) + 1)))
TYPO_RATE = 0.004  # per character: an input-method slip to another character
# How notes spell the same test: Latin abbreviations beside the Chinese names (per record, either).
ABBREVIATIONS = [
    ("白细胞计数", ["WBC ", "WBC", "wbc "]),
    ("中性粒细胞百分比", ["NEUT% ", "N% ", "NE%"]),
    ("血红蛋白", ["Hb ", "HGB ", "HB"]),
    ("C反应蛋白", ["CRP ", "CRP", "hs-CRP "]),
    ("肌钙蛋白I", ["cTnI", "TnI", "CTNI"]),
    ("糖化血红蛋白", ["HbA1c ", "HBA1C "]),
    ("尿素氮", ["BUN ", "Urea "]),
    ("肌酐", ["Cr ", "Scr ", "CREA "]),
    ("D-二聚体", ["D-D ", "D-dimer "]),
    ("心电图", ["ECG", "EKG"]),
    ("心脏彩超", ["UCG", "超声心动图"]),
    ("胸部CT", ["胸片CT", "肺部CT", "胸部HRCT"]),
    ("头颅MRI", ["头颅MR", "颅脑MRI+DWI"]),
]
# Other spellings of the same thing: units, temperature, half-width punctuation (pasted text).
VARIANT_SPELLINGS = [
    ("℃", ["°C", "度", "℃"]),
    ("mmHg", ["mmhg", "mmHg"]),
    ("次/分", ["bpm", "次/min"]),
    ("×10^9/L", ["*10^9/L", "x10^9/L"]),
]
PASTED = str.maketrans({"，": ",", "：": ":", "；": ";", "（": "(", "）": ")"})
TRADITIONAL = str.maketrans("发热咳痰压检诊疗医无头颈脉气厥应显图阳阴", "發熱欬痰壓檢診療醫無頭頸脈氣厥應顯圖陽陰")
HEADER = ["门诊病历", "急诊病历", "入院记录", "会诊记录", "首次病程记录"]
FREE_TEXT = [
    "患者{name}，{age}岁，{job}，住{place}",
    "{date}由{place}转入",
    "家属{name}陪同就诊，联系电话{phone}",
    "住院号{number}",
    "{date} {time}查房：患者诉{vague}",
    "自带外院病历，{place}医院{date}检查",
    "既往于{place}诊所多次输液治疗，具体用药不详",
    "医嘱：{drug}",
]
JOBS = ["退休", "务农", "工人", "个体", "教师", "司机", "无业", "职员"]


def rare_chars(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(CJK_POOL, cum_weights=ZIPF_CUMULATIVE, k=n))


def free_text(rng: random.Random) -> str:
    """A sentence of the kind real notes carry beside the findings: names, places, dates, numbers."""
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    values = {
        "name": rng.choice("王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗") + rare_chars(rng, rng.randint(1, 2)),
        "age": str(rng.randint(18, 92)),
        "job": rng.choice(JOBS),
        "place": rare_chars(rng, rng.randint(2, 3)) + rng.choice(["县", "市", "镇", "村", "区"]),
        "date": rng.choice([f"2023-{month:02d}-{day:02d}", f"2023年{month}月{day}日", f"{month}.{day}"]),
        "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        "phone": f"1{rng.randint(3, 9)}{rng.randint(0, 999999999):09d}",
        "number": f"{rng.randint(0, 99999999):08d}",
        "vague": rng.choice(VAGUE_COMPLAINTS + ["无特殊不适", "睡眠一般"]),
        "drug": rng.choice(DRUGS + ANTIHYPERTENSIVES)
        + f" {rng.choice([0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40])}{rng.choice(['mg', 'g', 'ml'])} {rng.choice(['qd', 'bid', 'tid', 'q8h', 'prn', 'st'])}",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], rng.choice(FREE_TEXT))


def realistic_record(rng: random.Random, key: str) -> str:
    """A default note made to read like real ones: lengths from a line to a page (sections dropped,
    free text added), Latin abbreviations and other spellings, names and places of rare characters,
    typos, now and then traditional characters or half-width punctuation from pasted text."""
    sections = record_sections(rng, key)
    if rng.random() < 0.25:  # a short outpatient note: complaint and one more section
        sections = sections[:1] + rng.sample(sections[1:], min(1, len(sections) - 1))
    extra = [free_text(rng) for _ in range(min(int(rng.expovariate(0.6)), 12))]  # mostly 0-2, a long tail
    text = rng.choice(HEADER) + "：" + "".join(f"{title}：{body}。" for title, body in sections)
    text += "".join(f"{sentence}。" for sentence in extra)
    for name, spellings in ABBREVIATIONS:
        if name in text and rng.random() < 0.5:
            text = text.replace(name, rng.choice(spellings))
    for name, spellings in VARIANT_SPELLINGS:
        if name in text and rng.random() < 0.3:
            text = text.replace(name, rng.choice(spellings))
    if rng.random() < 0.05:
        text = text.translate(TRADITIONAL)
    if rng.random() < 0.1:
        text = text.translate(PASTED)
    chars = list(text)
    for i in range(len(chars)):
        if "\u4e00" <= chars[i] <= "\u9fa5" and rng.random() < TYPO_RATE:
            chars[i] = rare_chars(rng, 1)
    return "".join(chars)


# ---------------------------------------------------------------------------
# Splits, noise, output
# ---------------------------------------------------------------------------


def class_sequence(rng: random.Random, size: int, weights: list | None = None) -> list:
    """Class keys for one split: counts follow `weights` (default: CLASSES weights), order is shuffled.

    Fixed counts (largest-remainder rounding) instead of independent draws, so
    even the 500-record splits are roughly, but not exactly, balanced.
    """
    weights = weights or [w for _, _, w in CLASSES]
    shares = [size * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    keys = [key for key, n in zip(KEYS, counts) for _ in range(n)]
    rng.shuffle(keys)
    return keys


def varied_record(rng: random.Random, key: str) -> str:
    """A note of a length drawn from VARIED_LENGTH: cut at the last clause end before it, or
    continued with further notes of the class (a follow-up visit) until it is that long."""
    mu, sigma, least = VARIED_LENGTH
    target = least + int(rng.lognormvariate(mu, sigma))
    text = make_record(rng, key)
    while len(text) < target:
        text += make_record(rng, key)
    cut = max(text.rfind(mark, 0, target) for mark in "。，；")  # the last clause that fits
    return text[: cut + 1] if cut + 1 >= 0.8 * target else text[:target]


def make_split(index: int, size: int, noisy: bool, mode: str = "default") -> list:
    seed = {"long": LONG_SEED, "varied": VARIED_SEED, "realistic": REALISTIC_SEED}.get(mode, SEED)
    rng = random.Random(seed + index)  # independent stream per split
    make = {"long": long_record, "varied": varied_record, "realistic": realistic_record}.get(mode, make_record)
    rows = [{"text": make(rng, key), "label": LABEL_OF[key]} for key in class_sequence(rng, size)]
    if noisy:
        # Separate stream so the noise rate can change without changing the texts.
        noise_rng = random.Random(seed + 1000 + index)
        labels = [label for _, label, _ in CLASSES]
        for row in rows:
            if noise_rng.random() < TRAIN_LABEL_NOISE:
                row["label"] = noise_rng.choice([lab for lab in labels if lab != row["label"]])
    return rows


def make_variant_split(mode: str, index: int, size: int) -> list:
    """A split of the multilabel or imbalanced set (own seeds: the default files are untouched)."""
    rng = random.Random(SEED + 100 * (1 + list(VARIANTS).index(mode)) + index)
    if mode == "imbalanced":
        keys = class_sequence(rng, size, [IMBALANCED_SHARES[key] for key in KEYS])
        return [{"text": make_record(rng, key), "label": LABEL_OF[key]} for key in keys]
    rows = []
    for _ in range(size):
        keys = rng.sample(KEYS, rng.choices(*COMORBID_COUNTS)[0])
        rows.append({"text": make_comorbid_record(rng, keys), "label": sorted(LABEL_OF[key] for key in keys)})
    return rows


VARIANTS = ("multilabel", "imbalanced")
UNLABELLED_INDEX = 50  # a split index no labelled split uses: its own random stream


def unlabelled_rows(mode: str, size: int) -> list:
    """`size` more notes of `mode`'s kind, without their labels (domain-adaptive pretraining's text)."""
    rows = (
        make_variant_split(mode, UNLABELLED_INDEX, size) if mode in VARIANTS else make_split(UNLABELLED_INDEX, size, False, mode)
    )
    return [{"text": row["text"]} for row in rows]


def write_jsonl_atomic(path: Path, rows: list) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check(data: dict) -> None:
    """Print counts, length stats and two naive baselines (for tuning the overlap)."""
    labels = [label for _, label, _ in CLASSES]
    for name, rows in data.items():
        lengths = sorted(len(r["text"]) for r in rows)
        counts = Counter(r["label"] for r in rows)
        print(
            f"{name}: n={len(rows)} len min/median/max={lengths[0]}/{statistics.median(lengths):.0f}/"
            f"{lengths[-1]} >512={sum(n > 512 for n in lengths)}"
        )
        print("  " + ", ".join(f"{lab}={counts[lab]}" for lab in labels))
    train, dev = list(data.values())[:2]

    # Baseline 1: bag-of-characters nearest centroid (cosine).
    def vec(text: str) -> dict:
        c = Counter(text)
        norm = sum(v * v for v in c.values()) ** 0.5
        return {ch: v / norm for ch, v in c.items()}

    centroids = {lab: Counter() for lab in labels}
    for r in train:
        centroids[r["label"]].update(vec(r["text"]))
    for lab in labels:
        norm = sum(v * v for v in centroids[lab].values()) ** 0.5
        centroids[lab] = {ch: v / norm for ch, v in centroids[lab].items()}
    correct = 0
    for r in dev:
        v = vec(r["text"])
        scores = [(sum(w * centroids[lab].get(ch, 0.0) for ch, w in v.items()), lab) for lab in labels]
        correct += max(scores)[1] == r["label"]
    print(f"dev accuracy, bag-of-characters nearest centroid: {correct / len(dev):.3f}")

    # Baseline 2: best single character-bigram keyword per class (max F1 on train).
    doc_bigrams = [sorted({r["text"][i : i + 2] for i in range(len(r["text"]) - 1)}) for r in train]
    df, df_class = Counter(), Counter()
    for r, grams in zip(train, doc_bigrams):
        df.update(grams)
        df_class.update((g, r["label"]) for g in grams)
    class_n = Counter(r["label"] for r in train)
    rules = []  # (precision, keyword, label)
    for lab in labels:
        best = max((2 * df_class[(g, lab)] / (df[g] + class_n[lab]), g) for g in sorted(df))
        kw = best[1]
        rules.append((df_class[(kw, lab)] / df[kw], kw, lab))
    rules.sort(reverse=True)
    fallback = class_n.most_common(1)[0][0]
    correct = 0
    for r in dev:
        pred = next((lab for _, kw, lab in rules if kw in r["text"]), fallback)
        correct += pred == r["label"]
    print("keywords: " + ", ".join(f"{lab}:{kw}({p:.2f})" for p, kw, lab in rules))
    print(f"dev accuracy, best single keyword per class: {correct / len(dev):.3f}")


def char_statistics(data: dict) -> None:
    """What the realistic mode is for: how many characters the training split sees rarely, and how
    many of dev's characters it never saw."""
    train, *others = data.values()
    counts = Counter(c for row in train for c in row["text"])
    once = sum(n == 1 for n in counts.values())
    print(
        f"train: {len(counts)} distinct characters, {once} seen once, {sum(n >= 2 for n in counts.values())} seen twice or more"
    )
    for name, rows in list(data.items())[1:]:
        unseen = sum(counts[c] == 0 for row in rows for c in row["text"])
        print(f"{name}: {unseen} characters never seen in train ({unseen / sum(len(r['text']) for r in rows):.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="print counts, lengths and naive baselines")
    parser.add_argument(
        "--mode",
        choices=["default", "long", "varied", "realistic", *VARIANTS],
        default="default",
        help="which set to write (default: the sample data)",
    )
    parser.add_argument("--unlabelled", type=int, default=0, help="write this many notes without labels to --out instead")
    parser.add_argument("--out", default="", help="the .jsonl file --unlabelled writes")
    args = parser.parse_args()
    if args.unlabelled < 0:
        parser.error(f"--unlabelled must be a number of notes, at least 1 (got {args.unlabelled})")
    if args.unlabelled:
        if not args.out:
            parser.error("--unlabelled needs --out FILE.jsonl")
        write_jsonl_atomic(Path(args.out), unlabelled_rows(args.mode, args.unlabelled))
        print(f"wrote {args.out} ({args.unlabelled} unlabelled {args.mode} notes)")
        return
    if args.mode in VARIANTS:
        for index, (name, size) in enumerate(VARIANT_SPLITS):
            rows = make_variant_split(args.mode, index, size)
            write_jsonl_atomic(SAMPLE_DATA_DIR / f"{args.mode}_{name}.jsonl", rows)
            counts = Counter(label for row in rows for label in (row["label"] if args.mode == "multilabel" else [row["label"]]))
            print(f"wrote {SAMPLE_DATA_DIR / f'{args.mode}_{name}.jsonl'} ({len(rows)} records; {dict(counts.most_common())})")
        return
    data = {}
    splits = {"long": LONG_SPLITS, "varied": VARIED_SPLITS, "realistic": REALISTIC_SPLITS}.get(args.mode, SPLITS)
    for index, (name, size, noisy) in enumerate(splits):
        rows = make_split(index, size, noisy, args.mode)
        write_jsonl_atomic(SAMPLE_DATA_DIR / f"{name}.jsonl", rows)
        data[name] = rows
        print(f"wrote {SAMPLE_DATA_DIR / f'{name}.jsonl'} ({len(rows)} records)")
    if args.check:
        check(data)
        if args.mode == "realistic":
            char_statistics(data)


if __name__ == "__main__":
    main()
