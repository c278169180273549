"""Label tables: class names, palettes and raw label value -> train id, copied from the official releases.

datafiles.map_labels is the one place that applies them; raw values that are neither a class nor ignore are INVALID
(an error in the data, reported with the file). Sources: tests/testdata/README.md.
"""
import numpy as np

IGNORE_INDEX = -1  # the ignore label of every label tensor here (raw files' 255 / 65535 / 0 map to it): no class is < 0


def hex_palette(s):
    return np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in s.split()], np.uint8)


INVALID = -2  # lut entry of a raw value that is neither a class nor ignore: an error in the data


def lookup_table(mapping, default, size=256):
    """Raw label value -> train id (int32). One extra last entry, INVALID, catches values >= size."""
    lut = np.full(size + 1, default, np.int32)
    lut[list(mapping)] = list(mapping.values())
    lut[-1] = INVALID
    return lut


# Cityscapes (cityscapesScripts 2.3.0): the 19 train classes and their labelIds; the other ids 0..33 -> ignore,
# values above 33 are no labelId (a wrong file, e.g. labelTrainIds or colour) -> error.
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_PALETTE = hex_palette(
    "804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 00008e 000046 "
    "003c64 005064 0000e6 770b20 ")
CITYSCAPES_LUT = lookup_table({**{v: IGNORE_INDEX for v in range(34)}, **dict(zip(CITYSCAPES_LABEL_IDS, range(19)))},
                              INVALID)

# ADE20K-150 (mmseg ade.py; "bed " keeps its trailing space): PNG 0 = other -> ignore, v in 1..150 -> v - 1.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
ADE20K_PALETTE = hex_palette(
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d 787846 08ff33 ff0652 "
    "8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 "
    "ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff "
    "8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff 0bc8c8 ff5200 00fff5 003dff "
    "00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff "
    "ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff "
    "00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 "
    "5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 "
    "0abed4 d6ff00 00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff "
    "b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff ")
ADE20K_LUT = lookup_table({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, 151)}}, default=INVALID)

# COCO-Stuff-164k stuffthingmaps (mmseg coco_stuff.py / coco_stuff164k.py): PNG values 0..181 are the
# cocostuff labels.txt id - 1; the 171 used ones map to 0..170 in order, the 11 unused thing ids and 255 -> ignore,
# 182..254 -> error (mmseg maps them to ignore, silently).
COCO_STUFF_UNUSED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
COCO_STUFF_RAW_IDS = [v for v in range(182) if v not in COCO_STUFF_UNUSED]
COCO_STUFF_LUT = lookup_table({**{v: IGNORE_INDEX for v in COCO_STUFF_UNUSED + [255]},
                               **dict(zip(COCO_STUFF_RAW_IDS, range(171)))},
                      INVALID)
COCO_STUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner",
    "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
]
COCO_STUFF_PALETTE = hex_palette(
    "00c040 00c040 004060 80c0c0 004040 00c0e0 00c0c0 80c040 00c060 80c040 8020c0 0000e0 000040 00a0c0 800060 8000c0 "
    "0020c0 8080e0 0000c0 80a0c0 808000 800020 802000 800080 408020 00a000 000000 c080a0 002000 008080 4080a0 80a000 "
    "008000 c08020 806080 000080 400020 00e080 800000 c000a0 006080 808080 4000a0 80e080 808040 c00020 806000 8000c0 "
    "008020 40e000 000040 8080a0 406000 0080c0 0080a0 c0e000 008040 808020 c02080 0040c0 000020 40a080 804040 8000a0 "
    "402080 80c0c0 0000a0 c0a080 80c000 800060 c02000 804080 408060 40a000 004000 c080e0 402000 00c080 4080e0 c0a000 "
    "00c000 c08060 c06080 004080 400060 40e080 804000 c000e0 406080 80c080 4000e0 c0e080 80c040 c00060 c06000 8040c0 "
    "008060 00e000 404040 8080e0 006000 40c0c0 0080e0 80e000 40c040 808060 802080 4000c0 004060 00a080 c00040 8040e0 "
    "002080 c080c0 0040e0 80a080 c08000 804020 802040 c00080 40c020 00a040 400000 c0c0a0 002040 408080 40c0a0 80a040 "
    "408000 c0c020 8060c0 400080 404020 00e0c0 c00000 c040a0 0060c0 c08080 4040a0 80e0c0 c08040 c04020 806040 c000c0 "
    "00c020 40e040 400040 80c0a0 406040 4080c0 00c0a0 c0e040 408040 80c020 c020c0 4040c0 004020 40a0c0 c04040 8040a0 "
    "4020c0 c0c0c0 0040a0 c0a0c0 c0c000 804060 c02040 c04080 40c060 40a040 404000 ")


def default_palette(n):
    """Deterministic distinct colours (the PASCAL VOC bit pattern, starting after black)."""
    c, k = np.arange(1, n + 1)[:, None], np.arange(3)
    return sum(((c >> (3 * j + k)) & 1) << (7 - j) for j in range(8)).astype(np.uint8)


# ADE20K-Full (ADE20K_2021_17_01, 847 classes, "A-847"): generated from tests/testdata/ade20k_full_847_labels.json, a copy
# of ADE20K_SEM_SEG_FULL_CATEGORIES in facebookresearch/MaskFormer datasets/prepare_ade20k_full_sem_seg.py @da3e60d.
# Train id = position in the list; the release's <name>_seg.png holds raw id = R // 10 * 256 + G (MaskFormer's
# loadAde20K), and every raw id not listed (0 included) is ignored. MaskFormer's converted .tif files hold the
# train ids directly, 65535 = ignore.
ADE20K_FULL_CLASSES = [
    "wall", "building, edifice", "sky", "tree", "road, route", "floor, flooring", "ceiling", "bed",
    "sidewalk, pavement", "earth, ground", "cabinet", "person, individual, someone, somebody, mortal, soul",
    "grass", "windowpane, window", "car, auto, automobile, machine, motorcar", "mountain, mount",
    "plant, flora, plant life", "table", "chair", "curtain, drape, drapery, mantle, pall", "door",
    "sofa, couch, lounge", "sea", "painting, picture", "water", "mirror", "house", "rug, carpet, carpeting",
    "shelf", "armchair", "fence, fencing", "field", "lamp", "rock, stone", "seat", "river", "desk",
    "bathtub, bathing tub, bath, tub", "railing, rail", "signboard, sign", "cushion", "path", "work surface",
    "stairs, steps", "column, pillar", "sink", "wardrobe, closet, press", "snow", "refrigerator, icebox",
    "base, pedestal, stand", "bridge, span", "blind, screen", "runway", "cliff, drop, drop-off", "sand",
    "fireplace, hearth, open fireplace", "pillow", "screen door, screen",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "skyscraper", "grandstand, covered stand", "box",
    "pool table, billiard table, snooker table", "palm, palm tree", "double door", "coffee table, cocktail table",
    "counter", "countertop", "chest of drawers, chest, bureau, dresser", "kitchen island", "boat",
    "waterfall, falls", "stove, kitchen stove, range, kitchen range, cooking stove", "flower", "bookcase",
    "controls", "book", "stairway, staircase", "streetlight, street lamp",
    "computer, computing machine, computing device, data processor, electronic computer, information processing system",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle",
    "swivel chair", "light, light source", "bench", "case, display case, showcase, vitrine", "towel", "fountain",
    "embankment",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box", "van",
    "hill", "awning, sunshade, sunblind", "poster, posting, placard, notice, bill, card", "truck, motortruck",
    "airplane, aeroplane, plane", "pole", "tower", "court", "ball",
    "aircraft carrier, carrier, flattop, attack aircraft carrier", "buffet, counter, sideboard",
    "hovel, hut, hutch, shack, shanty", "apparel, wearing apparel, dress, clothes", "minibike, motorbike",
    "animal, animate being, beast, brute, creature, fauna", "chandelier, pendant, pendent", "step, stair",
    "booth, cubicle, stall, kiosk", "bicycle, bike, wheel, cycle", "doorframe, doorcase", "sconce", "pond",
    "trade name, brand name, brand, marque", "bannister, banister, balustrade, balusters, handrail", "bag",
    "traffic light, traffic signal, stoplight", "gazebo", "escalator, moving staircase, moving stairway",
    "land, ground, soil", "board, plank", "arcade machine", "eiderdown, duvet, continental quilt", "bar",
    "stall, stand, sales booth", "playground", "ship", "ottoman, pouf, pouffe, puff, hassock",
    "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin",
    "bottle", "cradle", "pot, flowerpot", "conveyer belt, conveyor belt, conveyer, conveyor, transporter",
    "train, railroad train", "stool", "lake", "tank, storage tank", "ice, water ice", "basket, handbasket",
    "manhole", "tent, collapsible shelter", "canopy", "microwave, microwave oven", "barrel, cask", "dirt track",
    "beam", "dishwasher, dish washer, dishwashing machine", "plate", "screen, crt screen", "ruins",
    "washer, automatic washer, washing machine", "blanket, cover", "plaything, toy", "food, solid food",
    "screen, silver screen, projection screen", "oven", "stage", "beacon, lighthouse, beacon light, pharos",
    "umbrella", "sculpture", "aqueduct", "container", "scaffolding, staging", "hood, exhaust hood",
    "curb, curbing, kerb", "roller coaster", "horse, equus caballus", "catwalk", "glass, drinking glass", "vase",
    "central reservation", "carousel", "radiator", "closet", "machine", "pier, wharf, wharfage, dock", "fan",
    "inflatable bounce game", "pitch", "paper", "arcade, colonnade", "hot tub", "helicopter", "tray",
    "partition, divider", "vineyard", "bowl", "bullring", "flag", "pot",
    "footbridge, overcrossing, pedestrian bridge", "shower", "bag, traveling bag, travelling bag, grip, suitcase",
    "bulletin board, notice board", "confessional booth", "trunk, tree trunk, bole", "forest", "elevator door",
    "laptop, laptop computer", "instrument panel", "bucket, pail", "tapestry, tapis", "platform", "jacket", "gate",
    "monitor, monitoring device", "telephone booth, phone booth, call box, telephone box, telephone kiosk",
    "spotlight, spot", "ring", "control panel", "blackboard, chalkboard", "air conditioner, air conditioning",
    "chest", "clock", "sand dune", "pipe, pipage, piping", "vault", "table football", "cannon",
    "swimming pool, swimming bath, natatorium", "fluorescent, fluorescent fixture", "statue",
    "loudspeaker, speaker, speaker unit, loudspeaker system, speaker system", "exhibitor", "ladder", "carport",
    "dam", "pulpit", "skylight, fanlight", "water tower", "grill, grille, grillwork", "display board",
    "pane, pane of glass, window glass", "rubbish, trash, scrap", "ice rink", "fruit", "patio", "vending machine",
    "telephone, phone, telephone set", "net", "backpack, back pack, knapsack, packsack, rucksack, haversack", "jar",
    "track", "magazine", "shutter", "roof", "banner, streamer", "landfill", "post", "altarpiece, reredos",
    "hat, chapeau, lid", "arch, archway", "table game", "bag, handbag, pocketbook, purse",
    "document, written document, papers", "dome", "pier", "shanties", "forecourt", "crane",
    "dog, domestic dog, canis familiaris", "piano, pianoforte, forte-piano", "drawing", "cabin",
    "ad, advertisement, advertizement, advertising, advertizing, advert", "amphitheater, amphitheatre, coliseum",
    "monument", "henhouse", "cockpit", "heater, warmer", "windmill, aerogenerator, wind generator", "pool",
    "elevator, lift", "decoration, ornament, ornamentation", "labyrinth", "text, textual matter", "printer",
    "mezzanine, first balcony", "mattress", "straw", "stalls", "patio, terrace", "billboard, hoarding", "bus stop",
    "trouser, pant", "console table, console", "rack", "notebook", "shrine", "pantry", "cart", "steam shovel",
    "porch", "postbox, mailbox, letter box", "figurine, statuette", "recycling bin", "folding screen", "telescope",
    "deck chair, beach chair", "kennel", "coffee maker", "altar, communion table, lord's table", "fish", "easel",
    "artificial golf green", "iceberg", "candlestick, candle holder", "shower stall, shower bath",
    "television stand", "wall socket, wall plug, electric outlet, electrical outlet, outlet, electric receptacle",
    "skeleton", "grand piano, grand", "candy, confect", "grille door", "pedestal, plinth, footstall",
    "jersey, t-shirt, tee shirt", "shoe", "gravestone, headstone, tombstone", "shanty", "structure",
    "rocking chair, rocker", "bird", "place mat", "tomb", "big top",
    "gas pump, gasoline pump, petrol pump, island dispenser", "lockers", "cage", "finger", "bleachers",
    "ferris wheel", "hairdresser chair", "mat", "stands", "aquarium, fish tank, marine museum",
    "streetcar, tram, tramcar, trolley, trolley car", "napkin, table napkin, serviette", "dummy",
    "booklet, brochure, folder, leaflet, pamphlet", "sand trap", "shop, store", "table cloth", "service station",
    "coffin", "drawer", "cages", "slot machine, coin machine", "balcony", "volleyball court", "table tennis",
    "control table", "shirt", "merchandise, ware, product", "railway", "parterre", "chimney", "can, tin, tin can",
    "tanks", "fabric, cloth, material, textile", "alga, algae", "system", "map", "greenhouse", "mug", "barbecue",
    "trailer", "toilet tissue, toilet paper, bathroom tissue", "organ", "dishrag, dishcloth", "island", "keyboard",
    "trench", "basket, basketball hoop, hoop", "steering wheel, wheel", "pitcher, ewer", "goal",
    "bread, breadstuff, staff of life", "beds", "wood", "file cabinet", "newspaper, paper", "motorboat", "rope",
    "guitar", "rubble", "scarf", "barrels", "cap", "leaves", "control tower", "dashboard", "bandstand", "lectern",
    "switch, electric switch, electrical switch", "baseboard, mopboard, skirting board", "shower room", "smoke",
    "faucet, spigot", "bulldozer", "saucepan", "shops", "meter", "crevasse", "gear", "candelabrum, candelabra",
    "sofa bed", "tunnel", "pallet", "wire, conducting wire", "kettle, boiler", "bidet",
    "baby buggy, baby carriage, carriage, perambulator, pram, stroller, go-cart, pushchair, pusher", "music stand",
    "pipe, tube", "cup", "parking meter", "ice hockey rink", "shelter", "weeds", "temple", "patty, cake",
    "ski slope", "panel", "wallet", "wheel", "towel rack, towel horse", "roundabout", "canister, cannister, tin",
    "rod", "soap dispenser", "bell", "canvas", "box office, ticket office, ticket booth", "teacup", "trellis",
    "workbench", "valley, vale", "toaster", "knife", "podium", "ramp", "tumble dryer",
    "fireplug, fire hydrant, plug", "gym shoe, sneaker, tennis shoe", "lab bench", "equipment", "rocky formation",
    "plastic", "calendar", "caravan", "check-in-desk", "ticket counter", "brush", "mill", "covered bridge",
    "bowling alley", "hanger", "excavator", "trestle", "revolving door", "blast furnace", "scale, weighing machine",
    "projector", "soap", "locker", "tractor", "stretcher", "frame", "grating", "alembic",
    "candle, taper, wax light", "barrier", "cardboard", "cave", "puddle", "tarp", "price tag", "watchtower",
    "meters", "light bulb, lightbulb, bulb, incandescent lamp, electric light, electric-light bulb", "tracks",
    "hair dryer", "skirt", "viaduct", "paper towel", "coat", "sheet",
    "fire extinguisher, extinguisher, asphyxiator", "water wheel", "pottery, clayware", "magazine rack", "teapot",
    "microphone, mike", "support", "forklift", "canyon", "cash register, register", "leaf, leafage, foliage",
    "remote control, remote", "soap dish", "windshield, windscreen", "cat", "cue, cue stick, pool cue, pool stick",
    "vent, venthole, vent-hole, blowhole", "videos", "shovel", "eaves", "antenna, aerial, transmitting aerial",
    "shipyard", "hen, biddy", "traffic cone", "washing machines", "truck crane", "cds", "niche", "scoreboard",
    "briefcase", "boot", "sweater, jumper", "hay", "pack", "bottle rack", "glacier", "pergola",
    "building materials", "television camera", "first floor", "rifle", "tennis table", "stadium", "safety belt",
    "cover", "dish rack", "synthesizer", "pumpkin", "gutter", "fruit stand", "ice floe, floe",
    "handle, grip, handgrip, hold", "wheelchair", "mousepad, mouse mat", "diploma", "fairground ride", "radio",
    "hotplate", "junk", "wheelbarrow", "stream", "toll plaza", "punching bag", "trough", "throne", "chair desk",
    "weighbridge", "extractor fan", "hanging clothes", "dish, dish aerial, dish antenna, saucer",
    "alarm clock, alarm", "ski lift", "chain", "garage", "mechanical shovel", "wine rack", "tramway", "treadmill",
    "menu", "block", "well", "witness stand", "branch", "duck", "casserole", "frying pan", "desk organizer", "mast",
    "spectacles, specs, eyeglasses, glasses", "service elevator", "dollhouse", "hammock", "clothes hanging",
    "photocopier", "notepad", "golf cart", "footpath", "cross", "baptismal font", "boiler", "skip", "rotisserie",
    "tables", "water mill", "helmet", "cover curtain", "brick", "table runner", "ashtray", "street box", "stick",
    "hangers", "cells", "urinal", "centerpiece", "portable fridge", "dvds", "golf club", "skirting board",
    "water cooler", "clipboard", "camera, photographic camera", "pigeonhole", "chips", "food processor", "post box",
    "lid", "drum", "blender", "cave entrance", "dental chair", "obelisk", "canoe", "mobile", "monitors",
    "pool ball", "cue rack", "baggage carts", "shore", "fork", "paper filer", "bicycle rack", "coat rack",
    "garland", "sports bag", "fish tank", "towel dispenser", "carriage", "brochure", "plaque", "stringer", "iron",
    "spoon", "flag pole", "toilet brush", "book stand", "water faucet, water tap, tap, hydrant", "ticket office",
    "broom", "dvd", "ice bucket", "carapace, shell, cuticle, shield", "tureen", "folders", "chess", "root",
    "sewing machine", "model", "pen", "violin", "sweatshirt", "recycling materials", "mitten",
    "chopping board, cutting board", "mask", "log", "mouse, computer mouse", "grill", "hole", "target", "trash bag",
    "chalk", "sticks", "balloon", "score", "hair spray", "roll", "runner", "engine", "inflatable glove", "games",
    "pallets", "baskets", "coop", "dvd player", "rocking horse", "buckets", "bread rolls", "shawl", "watering can",
    "spotlights", "post-it", "bowls", "security camera", "runner cloth", "lock",
    "alarm, warning device, alarm system", "side", "roulette", "bone", "cutlery", "pool balls", "wheels",
    "spice rack", "plant pots", "towel ring", "bread box", "video", "funfair", "breads", "tripod", "ironing board",
    "skimmer", "hollow", "scratching post", "tricycle", "file box", "mountain pass", "tombstones", "cooker",
    "card game, cards", "golf bag", "towel paper", "chaise lounge", "sun", "toilet paper holder", "rake", "key",
    "umbrella stand", "dartboard", "transformer", "fireplace utensils", "sweatshirts",
    "cellular telephone, cellular phone, cellphone, cell, mobile phone", "tallboy", "stapler", "sauna", "test tube",
    "palette", "shopping carts", "tools", "push button, push, button", "star", "roof rack", "barbed wire", "spray",
    "ear", "sponge", "racket", "tins", "eyeglasses", "file", "scarfs", "sugar bowl", "flip flop", "headstones",
    "laptop bag", "leash", "climbing frame", "suit hanger", "floor spotlight", "plate rack", "sewer", "hard drive",
    "sprinkler", "tools box", "necklace", "bulbs", "steel industry", "club", "jack", "door bars",
    "control panel, instrument panel, control board, board, panel", "hairbrush", "napkin holder", "office",
    "smoke detector", "utensils", "apron", "scissors", "terminal", "grinder", "entry phone", "newspaper stand",
    "pepper shaker", "onions", "central processing unit, cpu, c p u , central processor, processor, mainframe",
    "tape", "bat", "coaster", "calculator", "potatoes", "luggage rack", "salt", "street number", "viewpoint",
    "sword", "cd", "rowing machine", "plug", "andiron, firedog, dog, dog-iron", "pepper", "tongs", "bonfire",
    "dog dish", "belt", "dumbbells", "videocassette recorder, vcr", "hook", "envelopes", "shower faucet", "watch",
    "padlock", "swimming pool ladder", "spanners", "gravy boat", "notice board", "trash bags", "fire alarm",
    "ladle", "stethoscope", "rocket", "funnel", "bowling pins", "valve", "thermometer", "cups", "spice jar",
    "night light", "soaps", "games table", "slotted spoon", "reel", "scourer", "sleeping robe", "desk mat",
    "dumbbell", "hammer", "tie", "typewriter", "shaker", "cheese dish", "sea star", "racquet",
    "butane gas cylinder", "paper weight", "shaving brush", "sunglasses", "gear shift", "towel rail",
    "adding machine, totalizer, totaliser",
]
ADE20K_FULL_RAW_IDS = [
    2978, 312, 2420, 2855, 2131, 976, 447, 165, 2377, 838, 350, 1831, 1125, 3055, 401, 1610, 1910, 2684, 471, 687,
    774, 2473, 2264, 1735, 2994, 1564, 1276, 2178, 2329, 57, 907, 913, 1395, 2138, 2272, 2128, 724, 155, 2053, 2380,
    689, 1788, 3087, 2530, 581, 2388, 2985, 2454, 2096, 137, 294, 212, 2185, 524, 2212, 943, 1869, 2251, 2793, 2423,
    1121, 266, 1948, 1744, 783, 571, 627, 629, 491, 1374, 223, 3016, 2598, 978, 239, 608, 236, 2531, 2616, 591, 327,
    2679, 1451, 181, 420, 2821, 1023, 855, 2733, 2928, 1240, 77, 1969, 2880, 14, 1936, 2828, 631, 103, 3144, 308,
    1282, 38, 1563, 29, 480, 2569, 247, 187, 778, 2243, 1941, 2833, 120, 95, 2836, 1087, 868, 1401, 220, 47, 843,
    123, 2537, 1927, 2337, 1702, 64, 249, 642, 1981, 609, 2840, 2586, 1393, 2704, 1304, 146, 1494, 2739, 389, 1551,
    131, 738, 161, 747, 1919, 3109, 2179, 2989, 206, 1930, 1002, 2254, 1708, 2526, 160, 2901, 2262, 44, 597, 2235,
    1260, 682, 2151, 3107, 432, 1098, 2932, 461, 410, 2046, 533, 1481, 1858, 894, 1322, 1891, 1756, 49, 1272, 1229,
    2850, 1784, 2962, 259, 319, 954, 1974, 1013, 2356, 97, 318, 592, 2885, 1017, 851, 1407, 1332, 303, 2714, 1924,
    1346, 1081, 1583, 2727, 2509, 2123, 602, 202, 10, 490, 530, 2213, 1884, 2934, 2687, 387, 2668, 982, 2547, 1474,
    877, 1391, 414, 698, 2019, 2422, 3010, 1139, 753, 1747, 2175, 1301, 1033, 1789, 2939, 2730, 1652, 90, 1349,
    2830, 1485, 2370, 2155, 118, 1402, 1957, 3130, 1197, 52, 2688, 96, 762, 772, 1857, 2315, 1016, 643, 3105, 1849,
    791, 349, 6, 3114, 1587, 1233, 559, 1223, 3049, 1943, 853, 709, 1390, 2748, 2007, 1546, 1513, 2600, 2538, 1790,
    194, 326, 2877, 594, 2036, 1662, 2366, 1754, 418, 2553, 1951, 1963, 918, 2086, 997, 2731, 704, 1365, 569, 3108,
    948, 839, 63, 1305, 378, 2362, 2734, 2982, 2398, 1119, 382, 1141, 1805, 3102, 2341, 1131, 2316, 2626, 3104, 198,
    1896, 2800, 190, 3131, 1463, 357, 929, 209, 912, 1164, 1509, 2539, 3116, 2615, 1644, 818, 242, 2217, 2347, 2686,
    2300, 572, 789, 358, 2443, 101, 2969, 2692, 606, 2339, 1533, 2060, 1782, 495, 371, 2707, 889, 3156, 2683, 1499,
    1135, 1619, 125, 2838, 2792, 1695, 746, 1343, 1370, 2858, 145, 2565, 1892, 1103, 286, 170, 3073, 922, 1655,
    1602, 2160, 1151, 2176, 2239, 132, 394, 1424, 607, 700, 116, 1425, 2676, 141, 2360, 2449, 897, 317, 2228, 2351,
    1543, 656, 1088, 373, 2472, 2892, 1740, 3067, 1367, 188, 79, 1633, 1885, 677, 1779, 1297, 2334, 3027, 2735,
    1791, 2405, 1748, 2983, 3035, 2824, 2168, 385, 2148, 2465, 175, 390, 268, 2722, 2857, 3088, 2926, 2782, 1378,
    1934, 2072, 2889, 944, 1158, 1383, 867, 2145, 1915, 361, 402, 482, 2761, 300, 1554, 636, 260, 1186, 871, 2859,
    2103, 208, 2236, 2012, 2462, 1462, 2832, 2617, 1024, 1129, 18, 376, 134, 407, 434, 2017, 2717, 2005, 2993, 1545,
    1445, 2831, 1161, 2411, 2949, 1769, 552, 2327, 939, 3013, 1986, 1486, 2723, 1549, 2649, 1020, 392, 422, 1419,
    2099, 2464, 3058, 430, 675, 2941, 2955, 2355, 840, 32, 2338, 1232, 2834, 2991, 2879, 444, 1657, 2246, 296, 245,
    2661, 1202, 1714, 251, 1095, 1828, 311, 2732, 947, 2115, 2738, 2525, 2194, 634, 740, 2682, 2020, 1156, 1036,
    1295, 1181, 3037, 1614, 736, 893, 2047, 1274, 1361, 3036, 2606, 2797, 2022, 2876, 2758, 472, 3028, 882, 1189,
    743, 3122, 2401, 468, 1061, 1523, 3059, 2843, 2853, 1529, 214, 3032, 3071, 277, 813, 426, 1039, 727, 1508, 2490,
    2299, 768, 1172, 537, 1847, 1664, 1110, 1014, 662, 121, 227, 2410, 2165, 2696, 3005, 1231, 635, 292, 2690, 65,
    2607, 2574, 1188, 456, 2913, 459, 1955, 827, 1111, 2412, 2997, 528, 366, 1863, 500, 1001, 1958, 1441, 809, 210,
    435, 718, 1674, 388, 1572, 1584, 1944, 674, 99, 2352, 1019, 1763, 185, 554, 1066, 2508, 951, 2822, 415, 297,
    1914, 2619, 1338, 2505, 955, 2786, 238, 3000, 2763, 299, 822, 1288, 3101, 2894, 992, 489, 2157, 2309, 1576,
    1810, 2964, 2662, 2087, 1569, 503, 1505, 1468, 1613, 1138, 1256, 2715, 2846, 477, 2576, 108, 2245, 1162, 2149,
    2183, 858, 1324, 1055, 1741, 149, 615, 825, 2143, 304, 283, 2322, 3017, 2510, 1960, 265, 2282, 2184, 1461, 3113,
    2372, 2166, 232, 693, 1945, 3039, 2494, 1908, 2827, 280, 2950, 1044, 288, 2863, 1342, 2409, 1258, 2249, 2862,
    920, 1607, 2802, 610, 3129, 1108, 2823, 476, 2641, 2788, 2070, 1368, 2903, 699, 2844, 942, 2663, 457, 2701,
    2540, 2231, 2746, 1738, 2350, 2808, 2025, 2541, 2156, 126, 2512, 831, 2503, 2039, 2774, 886, 919, 2240, 2636,
    963, 1218, 1406, 1420, 526, 2639, 975, 1921, 2305, 1193, 2517, 2809, 1647, 314, 2560, 545, 1345, 775, 603, 1163,
    1641, 1678, 2450, 2915, 42, 2242, 2741, 1143, 862, 1654, 1826, 1689, 3124, 2710, 152, 549, 360, 1982, 1478,
    2203, 2612, 2956, 2681, 437, 2171, 1933, 3110, 1824, 2803, 234, 764, 177, 817, 3145, 1262, 864, 2359, 2992,
    1725, 2667, 2484, 1133, 1667, 2847, 932, 1392, 2573, 2140, 1046, 264, 2927, 2752, 679, 2493, 1658, 2466, 1057,
    2444, 2093, 2248, 2432, 726, 816, 1171, 2766, 2900, 2313, 488, 2265, 2043, 332, 1771, 2320, 2646, 1089, 2826,
    3148,
]
ADE20K_FULL_PALETTE = default_palette(847)
ADE20K_FULL_LUT = lookup_table(dict(zip(ADE20K_FULL_RAW_IDS, range(847))), default=IGNORE_INDEX,
                               size=25 * 256 + 256)  # R//10<=25
ADE20K_FULL_TIF_LUT = lookup_table({**{i: i for i in range(847)}, 65535: IGNORE_INDEX}, default=INVALID,
                                   size=65536)  # uint16


# Cityscapes CE class weights (trainId order) of the official HRNet / ProtoSeg configs
CITYSCAPES_CLASS_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                            0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]

# Cityscapes facts (cityscapesScripts 2.3.0: labels.py categories; evalPixelLevelSemanticLabeling.py avgClassSize).
# Train ids of each of the 7 categories, and the mean instance size (pixels) that weights each class's iIoU.
CITYSCAPES_CATEGORIES = {"flat": [0, 1], "construction": [2, 3, 4], "object": [5, 6, 7], "nature": [8, 9],
                         "sky": [10], "human": [11, 12], "vehicle": [13, 14, 15, 16, 17, 18]}
CITYSCAPES_MEAN_INSTANCE_SIZE = {11: 3462.4756337644, 12: 3930.4788056518, 13: 12794.0202738185,   # person rider car
                                 14: 27855.1264367816, 15: 35732.1511111111, 16: 67583.7075812274,  # truck bus train
                                 17: 6298.7200839748, 18: 4672.3249222261}                        # motorcycle bicycle
INSTANCE_CATEGORIES = ("human", "vehicle")               # the categories whose classes all have instances

# The embedded synthetic dataset (data.SyntheticDataset): 5 classes, each drawn from 3 sub-class modes
SYNTHETIC_CLASSES = ["background", "alpha", "beta", "gamma", "delta"]
SYNTHETIC_MODES = [3, 3, 3, 3, 3]
SYNTHETIC_PALETTE = hex_palette("808080 9131b4 f58231 46f0f0 f032e6")

# file name endings of the folder dataset and predict.py, any case
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # folder dataset, any case
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")  # lossless only

# dataset -> (class names, palette): what a checkpoint's "dataset" names (predict.py, atlas.py)
CLASS_TABLES = {"cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE), "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
                "ade20k_full": (ADE20K_FULL_CLASSES, ADE20K_FULL_PALETTE),
                "coco_stuff": (COCO_STUFF_CLASSES, COCO_STUFF_PALETTE),
                "synthetic": (SYNTHETIC_CLASSES, SYNTHETIC_PALETTE)}
