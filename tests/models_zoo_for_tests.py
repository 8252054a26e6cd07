"""Networks written the way users write them (defined only in the tests), and a catalogue of model kinds for
the conformance suite."""

import torch
import torch.nn.functional as F
from torch import nn

from hetfuse.models import MLP, build_model
from hetfuse.repair import reset_batchnorm


class UserVGG(nn.Module):
    """The CIFAR VGG most people copy: a ``features`` Sequential (conv/BN/ReLU/max-pool) and a ``classifier``."""

    def __init__(self, cfg=(8, "M", 16, "M"), num_classes=10, bn=True):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if bn else []) + [nn.ReLU(True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * 8 * 8, num_classes)

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return self.classifier(out)


class ShortcutBlock(nn.Module):
    """A BasicBlock that adds its shortcut in place (``out += self.shortcut(x)``)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class UserResNet(nn.Module):
    """A CIFAR ResNet with ``F.avg_pool2d`` and in-place shortcut additions."""

    def __init__(self, blocks=(1, 2), width=8, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(*[ShortcutBlock(width, width) for _ in range(blocks[0])])
        self.layer2 = nn.Sequential(ShortcutBlock(width, 2 * width, 2),
                                    *[ShortcutBlock(2 * width, 2 * width) for _ in range(blocks[1] - 1)])
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.avg_pool2d(out, out.size(3))
        return self.linear(out.view(out.size(0), -1))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class BottleneckResNet(nn.Module):
    def __init__(self, blocks=(1, 2), width=8, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Bottleneck(width, width, 4 * width),
                                    *[Bottleneck(4 * width, width, 4 * width) for _ in range(blocks[0] - 1)])
        self.layer2 = nn.Sequential(Bottleneck(4 * width, 2 * width, 8 * width, 2),
                                    *[Bottleneck(8 * width, 2 * width, 8 * width) for _ in range(blocks[1] - 1)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResidualMLP(nn.Module):
    """A fully connected network with a residual stream: x -> stem -> (x + f(x)) blocks -> head."""

    def __init__(self, d_in=12, width=10, blocks=2, hidden=7, d_out=4):
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
                                    for _ in range(blocks))
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for blk in self.blocks:
            h = torch.relu(h + blk(h))
        return self.head(h)


class PreActBlock(nn.Module):
    """The pre-activation BasicBlock (He et al. 2016, as the popular CIFAR files write it): BN-ReLU-conv twice, the
    projection shortcut reading the pre-activated input, no activation after the addition."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """A pre-activation CIFAR ResNet: a bare stem conv, pre-activation stages, a final BN-ReLU, pooling, Linear."""

    def __init__(self, blocks=(1, 2), width=8, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(*[PreActBlock(width, width) for _ in range(blocks[0])])
        self.layer2 = nn.Sequential(PreActBlock(width, 2 * width, 2),
                                    *[PreActBlock(2 * width, 2 * width) for _ in range(blocks[1] - 1)])
        self.bn = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 projection + BN, and the
    input added back when the shape is kept."""

    def __init__(self, cin, cout, stride=1, expand=4):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Like(nn.Module):
    """A small MobileNetV2: stem conv, inverted residual stages (depthwise convolutions), a 1x1 head conv."""

    def __init__(self, blocks=(2, 2), width=8, num_classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(inplace=True)]
        c = width
        for i, n in enumerate(blocks):
            out = width * (i + 1)
            for k in range(n):
                layers.append(InvertedResidual(c, out, 2 if (k == 0 and i > 0) else 1))
                c = out
        layers += [nn.Conv2d(c, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


class ConvNeXtLikeBlock(nn.Module):
    """A ConvNeXt-style block on a residual stream (BatchNorm and 1x1 convs in place of LayerNorm and Linear):
    7x7 depthwise conv of the stream, norm, 1x1 expansion, GELU, 1x1 projection, added back."""

    def __init__(self, c, expand=4):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.pw1 = nn.Conv2d(c, expand * c, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(expand * c, c, 1)

    def forward(self, x):
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class ConvNeXtLike(nn.Module):
    def __init__(self, blocks=2, width=8, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.blocks = nn.Sequential(*[ConvNeXtLikeBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class HandAttention(nn.Module):
    """Hugging Face-style attention written by hand: three Linears, heads split with view/transpose,
    ``F.scaled_dot_product_attention``, an output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))


class HandEncoderLayer(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln_a, self.attn, self.ln_f = nn.LayerNorm(dim), HandAttention(dim, heads), nn.LayerNorm(dim)
        self.up, self.act, self.down = nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.ln_a(x))
        return x + self.down(self.act(self.up(self.ln_f(x))))


class HandViT(nn.Module):
    """A pre-LN ViT written by hand (not the zoo's): patch embedding, class token, learned positions, three-Linear
    attention, SiLU feed-forward, class-token pooling."""

    def __init__(self, depth=2, dim=16, heads=4, hidden=24, patch=8, num_classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (32 // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.layers = nn.ModuleList(HandEncoderLayer(dim, heads, hidden) for _ in range(depth))
        self.ln, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.ln(x)[:, 0])


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` as users build it: a Linear input projection of N x T x F sequences, the encoder
    (pre-LN or post-LN, batch first or not), mean pooling, a Linear head."""

    def __init__(self, norm_first=True, batch_first=True, depth=2, dim=16, heads=4, hidden=24):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(5, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.1, activation="gelu",
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


def bn1d_mlp(widths=(10, 8), d_in=12, d_out=4):
    layers, c = [], d_in
    for w in widths:
        layers += [nn.Linear(c, w), nn.BatchNorm1d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.Linear(c, d_out))


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.LayerNorm):  # a feature's LayerNorm entries must move with it
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _flat_inputs(n, seed, d=12):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _sequences(n, seed):
    return torch.randn(n, 7, 5, generator=torch.Generator().manual_seed(seed))


def _tokens(n, seed):
    return torch.randint(0, 40, (n, 6), generator=torch.Generator().manual_seed(seed))


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# kind -> (builder(seed), inputs(n, seed))
KINDS = {
    "mlp": (lambda s: MLP(12, [10, 8], 4, bias=True), _flat_inputs),
    "mlp-nobias": (lambda s: MLP(12, [10, 8], 4, bias=False), _flat_inputs),
    "mlp-bn1d": (lambda s: bn1d_mlp(), _flat_inputs),
    "fc-residual": (lambda s: ResidualMLP(), _flat_inputs),
    "vgg-bn": (lambda s: build_model("vgg11:w=0.125,bn", input_dim=3, output_dim=10, input_shape=(3, 32, 32)),
               _images),
    "resnet-projection": (lambda s: UserResNet(), _images),
    "resnet-bottleneck": (lambda s: BottleneckResNet(), _images),
    "resnet-preact": (lambda s: PreActResNet(), _images),
    "mobilenet-depthwise": (lambda s: MobileNetV2Like(), _images),
    "convnext-depthwise": (lambda s: ConvNeXtLike(), _images),
    "vit-hand": (lambda s: HandViT(), _images),
    "vit-zoo": (lambda s: build_model("vit:depth=2,dim=16,heads=2,patch=8,mlp=24,pool=mean", input_dim=3,
                                      output_dim=10, input_shape=(3, 32, 32)), _images),
    "vit-fused-qkv": (lambda s: build_model("vit:depth=2,dim=16,heads=4,patch=8,mlp=24,qkv=1", input_dim=3,
                                            output_dim=10, input_shape=(3, 32, 32)), _images),
    "torch-encoder-preln": (lambda s: TorchEncoder(norm_first=True), _sequences),
    "torch-encoder-postln": (lambda s: TorchEncoder(norm_first=False, batch_first=False), _sequences),
    "bert-zoo": (lambda s: build_model("bert:depth=2,dim=16,heads=4,vocab=40,seq=6,mlp=24", input_dim=6,
                                       output_dim=5, input_shape=(6,)), _tokens),
}


def _hf(kind):
    """A tiny Hugging Face classifier (random weights, nothing downloaded) as a module returning its logits."""
    import transformers

    from hetfuse.hf import Logits

    if kind == "bert":
        config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=24, max_position_embeddings=8, num_labels=3,
                                         attn_implementation="sdpa")
        return Logits(transformers.BertForSequenceClassification(config).eval())
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=24, num_labels=10,
                                    attn_implementation="sdpa")
    return Logits(transformers.ViTForImageClassification(config).eval())


try:  # the hf extra: Hugging Face kinds join the catalogue
    import transformers  # noqa: F401

    KINDS["hf-bert"] = (lambda s: _hf("bert"), _tokens)
    KINDS["hf-vit"] = (lambda s: _hf("vit"), _images)
except ImportError:
    pass

# kinds whose residual layers normalise after the addition (x -> LayerNorm(x + f(x))): a zero layer is not the identity
POST_NORM = {"torch-encoder-postln", "hf-bert"}


def make(kind, seed=0, data=None):
    """A model of ``kind`` with random weights; its BatchNorm statistics are those of ``data`` (as a trained
    network's are), so a BN reset on the same data leaves it unchanged."""
    builder, _ = KINDS[kind]
    torch.manual_seed(seed)
    model = randomize_norms(builder(seed), seed)
    if data is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        reset_batchnorm(model, data)
    return model.eval()


def inputs(kind, n, seed):
    return KINDS[kind][1](n, seed)
