"""DiskDescriptor.xml: the file that says which image files make up a ploop disk.

One builder (`descriptor_for`, from an image's header) for template caches
and containers' root.hdd alike. Format reference: ploop's lib/xml.c
(element names, order and layout) and include/ploop1_image.h (geometry).
"""

from __future__ import annotations

from vztt.base.errors import BuildError
from vztt.formats.ploop.image import CHS, DEFAULT_CLUSTER, IMAGE_NAME, SECTOR, ImageInfo, convert_to_chs

DESCRIPTOR_NAME = "DiskDescriptor.xml"
# ploop's own DiskDescriptor root on Virtuozzo 7 and later (older ploop wrote
# Parallels_disk_image; its reader accepts either).
DESCRIPTOR_ROOT = "Virtuozzo_disk_image"
# The GUID ploop gives the top (and here only) delta, and the "no parent" GUID.
TOPDELTA_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
NONE_GUID = "{00000000-0000-0000-0000-000000000000}"


def disk_descriptor_xml(disk_size_sectors: int, cylinders: int, heads: int, sectors: int,
                        blocksize_sectors: int = DEFAULT_CLUSTER // SECTOR, *,
                        image_file: str = IMAGE_NAME, root_element: str = "Parallels_disk_image") -> str:
    """DiskDescriptor.xml as ploop's ploop_store_diskdescriptor() writes it.

    Element names and order follow lib/xml.c; so does the layout (libxml2's
    xmlDocFormatDump: `<?xml version="1.0"?>`, two-space indent). ploop writes
    the root as `Parallels_disk_image` and its reader ignores the root's name.
    `sectors` is written as given; ploop writes Disk_size / (Cylinders * Heads),
    which `disk_geometry()` computes.
    """
    for name, v in (("disk_size_sectors", disk_size_sectors), ("cylinders", cylinders), ("heads", heads),
                    ("sectors", sectors), ("blocksize_sectors", blocksize_sectors)):
        if not isinstance(v, int) or v <= 0:
            raise BuildError(f"DiskDescriptor.xml: {name} must be a positive integer, not {v!r}")
    if not root_element.isidentifier() or any(c in image_file for c in "<>&\"'\n"):
        raise BuildError("DiskDescriptor.xml: bad root element or image file name")
    return (
        '<?xml version="1.0"?>\n'
        f"<{root_element}>\n"
        "  <Disk_Parameters>\n"
        f"    <Disk_size>{disk_size_sectors}</Disk_size>\n"
        f"    <Cylinders>{cylinders}</Cylinders>\n"
        f"    <Heads>{heads}</Heads>\n"
        f"    <Sectors>{sectors}</Sectors>\n"
        "    <Padding>0</Padding>\n"
        "  </Disk_Parameters>\n"
        "  <StorageData>\n"
        "    <Storage>\n"
        "      <Start>0</Start>\n"
        f"      <End>{disk_size_sectors}</End>\n"
        f"      <Blocksize>{blocksize_sectors}</Blocksize>\n"
        "      <Image>\n"
        f"        <GUID>{TOPDELTA_GUID}</GUID>\n"
        "        <Type>Compressed</Type>\n"
        f"        <File>{image_file}</File>\n"
        "      </Image>\n"
        "    </Storage>\n"
        "  </StorageData>\n"
        "  <Snapshots>\n"
        f"    <TopGUID>{TOPDELTA_GUID}</TopGUID>\n"
        "    <Shot>\n"
        f"      <GUID>{TOPDELTA_GUID}</GUID>\n"
        f"      <ParentGUID>{NONE_GUID}</ParentGUID>\n"
        "    </Shot>\n"
        "  </Snapshots>\n"
        f"</{root_element}>\n"
    )


def disk_geometry(disk_size_sectors: int) -> CHS:
    """The (cylinders, heads, sectors) ploop puts in DiskDescriptor.xml."""
    chs = convert_to_chs(disk_size_sectors)
    return CHS(chs.cylinders, chs.heads, disk_size_sectors // (chs.cylinders * chs.heads))


def descriptor_for(info: ImageInfo) -> str:
    """DiskDescriptor.xml for an image, from its header: the one way vztt makes one
    (template caches and containers' root.hdd alike)."""
    geo = disk_geometry(info.disk_sectors)
    return disk_descriptor_xml(info.disk_sectors, geo.cylinders, geo.heads, geo.sectors,
                               info.cluster_size // SECTOR, root_element=DESCRIPTOR_ROOT)
